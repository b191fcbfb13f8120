#!/usr/bin/env bash
# Create .venv and install layerscope with its test extras. torch==2.13.0 goes in FIRST so that no
# package pulls an unpinned (multi-GB CUDA) torch; the package itself only asks for torch>=2.2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
