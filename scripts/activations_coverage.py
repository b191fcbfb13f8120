"""Does ``layerscope activations`` run on every text architecture transformers can build?

For each architecture (tests/tiny_families.py ``text_model_types``): build a tiny random instance,
save it (safetensors + config.json), check that the model's own forward runs on 2 × 16 tokens (if
transformers itself fails at this tiny size the architecture is left out, with its error), then run
``layerscope.activations`` on two short texts. Outcomes:

* ok: a result, with how many heads were scored and which parts were skipped (each skip is a note
  in the result: no attention probabilities, no lens, no MLP, encoder-decoder read on its encoder);
* refused: a one-line LayerscopeError (a stated reason, what the CLI prints with exit 2);
* crash: any other exception — a bug to fix.

Usage: PYTHONPATH=src python scripts/activations_coverage.py [--only gpt2,t5] [--jobs 2]
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = ["The cat sat on the mat and looked at the dog. " * 20, "Attention is what the model does on text. " * 20]


def check(model_type: str) -> dict:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch

    import tiny_families
    import layerscope
    from layerscope.errors import LayerscopeError

    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path, model = tiny_families.build_tiny(model_type, Path(tmp) / "m")
            ids = torch.randint(0, min(64, model.config.get_text_config().vocab_size), (2, 16))
            extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
            with torch.no_grad():
                if getattr(model.config, "is_encoder_decoder", False):
                    model(input_ids=ids, decoder_input_ids=ids, **extra)
                else:
                    model(input_ids=ids, **extra)
        except Exception as exc:
            return {"type": model_type, "outcome": "excluded", "detail": f"{type(exc).__name__}: {str(exc)[:120]}"}
        try:
            r = layerscope.activations(path, TEXTS, batches=1, batch_size=2, seq_len=16)
        except LayerscopeError as exc:
            return {"type": model_type, "outcome": "refused", "detail": str(exc).replace(str(path), "<model>")[:160]}
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            return {"type": model_type, "outcome": "crash",
                    "detail": f"{type(exc).__name__}: {str(exc)[:120]} @ {Path(where.filename).name}:{where.lineno}"}
    skipped = [n.split(":")[0] for n in r.notes]
    return {"type": model_type, "outcome": "ok", "heads": len(r.heads), "lens": r.lens is not None,
            "neuron_layers": len(r.neuron_layers), "detail": "; ".join(skipped),
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated model types")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    import tiny_families

    types = args.only.split(",") if args.only else tiny_families.text_model_types()
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(check, types))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["outcome"]] = counts.get(row["outcome"], 0) + 1
        extra = (f"heads={row['heads']} lens={'yes' if row['lens'] else 'no'} mlp_layers={row['neuron_layers']}"
                 if row["outcome"] == "ok" else "")
        print(f"{row['type']:28s} {row['outcome']:8s} {extra} {row['detail']}".rstrip())
    ran = len(rows) - counts.get("excluded", 0)
    print(f"\n{len(rows)} architectures; {counts.get('excluded', 0)} excluded (transformers' own forward fails "
          f"at the tiny size); of the {ran} that run: ok {counts.get('ok', 0)}, refused with a reason "
          f"{counts.get('refused', 0)}, crashed {counts.get('crash', 0)}")
    return 1 if counts.get("crash") else 0


if __name__ == "__main__":
    sys.exit(main())
