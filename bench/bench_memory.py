"""Peak resident memory of ``layerscope.analyze``: it must not grow with the model.

For the 4-layer synthetic Llama checkpoint and a 16-layer variant (4x the layers; same d_model,
vocab and largest matrix; see make_checkpoint.py), the analysis runs in a FRESH subprocess, so
nothing allocated earlier counts. In that child:

  baseline  RSS after importing layerscope/torch/numpy/pandas and opening the source
            (``layerscope.open_source``: headers parsed, no tensor data read), just before analysing;
  peak      the kernel's high-water mark of RSS during ``layerscope.analyze(source, store=<fresh>)``:
            ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after resetting the high-water mark to the
            baseline (``echo 5 > /proc/self/clear_refs``), cross-checked by sampling
            /proc/self/statm every 5 ms (and psutil's ``memory_info().rss`` when installed).

Printed per size: baseline, peak, peak − baseline, the bound 4 × (largest matrix in float32 bytes)
= 4 × 32000 × 2048 × 4 bytes (1000 MiB), (peak − baseline) / bound, and the ratio of the 16-layer
to the 4-layer increase (≈ 1 means memory does not grow with model size).

``python bench/bench_memory.py [--small] [--dtype-large float32|bfloat16] [--root DIR]``
``--small``: 2-layer vs 8-layer d_model 512 variants (bound 4 × 32000 × 512 × 4 bytes).
By default both checkpoints are float32 on disk (the 16-layer one is 3.3 GB); ``--dtype-large
bfloat16`` stores the 16-layer one in bf16 instead (1.7 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
import childproc  # noqa: E402  (bench/ is on sys.path when run as a script)

HERE = Path(__file__).resolve().parent
MiB = 1 << 20


# -- child: one measured analysis -----------------------------------------------------------------
def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def child(path: str, store: str) -> int:
    import resource

    import numpy  # noqa: F401
    import pandas  # noqa: F401
    import torch  # noqa: F401

    import layerscope

    src = layerscope.open_source(path)
    largest = max(src.infos.values(), key=lambda i: i.numel)
    n_params = sum(i.numel for i in src.infos.values())
    dtypes = sorted({i.dtype for i in src.infos.values()})

    import gc

    gc.collect()
    baseline = _rss_now()
    hwm_before_reset = _status_kb("VmHWM")
    try:  # reset the RSS high-water mark to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    hwm_after_reset = _status_kb("VmHWM")
    maxrss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    # sampler: /proc/self/statm every 5 ms (+ psutil when installed, as a cross-check)
    try:
        import psutil

        proc = psutil.Process()
    except ImportError:
        proc = None
    sampled = {"statm": baseline, "psutil": proc.memory_info().rss if proc else None, "n": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            sampled["statm"] = max(sampled["statm"], _rss_now())
            if proc is not None:
                sampled["psutil"] = max(sampled["psutil"], proc.memory_info().rss)
            sampled["n"] += 1
            stop.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    res = layerscope.analyze(src, store=store)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    maxrss_end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {
        "path": path, "n_tensors": len(src.infos), "n_params": n_params, "dtypes": dtypes,
        "largest_name": largest.name, "largest_shape": list(largest.shape), "largest_numel": largest.numel,
        "baseline_rss": baseline, "hwm_reset": reset,
        "hwm_before_reset_kb": hwm_before_reset, "hwm_after_reset_kb": hwm_after_reset,
        "maxrss_at_baseline": maxrss_base, "maxrss_end": maxrss_end,
        "sampled_peak_statm": sampled["statm"], "sampled_peak_psutil": sampled["psutil"], "samples": sampled["n"],
        "final_rss": _rss_now(), "seconds": seconds, "computed": res.computed, "cached": res.cached,
        "rows": len(res.table), "errors": int((res.table["error"] != "").sum()),
        "workers": res.config.resolved_workers(),
    }
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# -- parent: build, run children, report ----------------------------------------------------------
def run_child(path: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="layerscope-mem-") as tmp:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(path), "--store", str(Path(tmp) / "s.sqlite")]
        return childproc.run_child(cmd)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="2- vs 8-layer d_model 512 variants (smoke run)")
    ap.add_argument("--root", default=None, help="checkpoint cache folder (default /tmp/layerscope-bench)")
    ap.add_argument("--dtype-large", default="float32", choices=["float32", "bfloat16"],
                    help="on-disk dtype of the 4x-layers checkpoint (default float32, like the small one)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args.store)

    sys.path.insert(0, str(HERE))
    import torch

    from make_checkpoint import DEFAULT_ROOT, ensure_checkpoint, warm_page_cache

    root = args.root or DEFAULT_ROOT
    base_layers = 2 if args.small else 4
    sizes = [(base_layers, "float32"), (4 * base_layers, args.dtype_large)]
    results = []
    for n_layers, dtype in sizes:
        path = ensure_checkpoint(root, n_layers=n_layers, dtype=getattr(torch, dtype), small=args.small)
        warm_page_cache(path)  # page cache is not our RSS, but keeps disk speed out of the timing
        print(f"[bench_memory] measuring {path} in a fresh subprocess ...", file=sys.stderr, flush=True)
        r = run_child(path)
        r["layers"], r["disk_dtype"] = n_layers, dtype
        results.append(r)

    print(f"\n=== bench_memory: peak RSS of layerscope.analyze in a fresh process "
          f"({'SMALL d_model 512' if args.small else 'd_model 2048'} Llama) ===")
    hdr = (f"  {'layers':>6s} {'params':>8s} {'on disk':>8s} {'largest matrix':>16s} {'baseline':>9s} {'peak':>9s} "
           f"{'peak-base':>9s} {'bound':>9s} {'(peak-base)/bound':>17s} {'sampled':>9s} {'seconds':>8s}")
    print(hdr)
    print("  " + " " * 50 + "(MiB)     (MiB)      (MiB)     (MiB)                      peak-base")
    for r in results:
        bound = 4 * r["largest_numel"] * 4
        peak = r["maxrss_end"]
        delta = peak - r["baseline_rss"]
        sampled = max(v for v in (r["sampled_peak_statm"], r["sampled_peak_psutil"]) if v is not None) - r["baseline_rss"]
        r["delta"], r["bound"] = delta, bound
        shape = "x".join(map(str, r["largest_shape"]))
        print(f"  {r['layers']:6d} {r['n_params'] / 1e6:7.0f}M {r['disk_dtype']:>8s} {shape:>16s} "
              f"{r['baseline_rss'] / MiB:9.0f} {peak / MiB:9.0f} {delta / MiB:9.0f} {bound / MiB:9.0f} "
              f"{delta / bound:17.3f} {sampled / MiB:9.0f} {r['seconds']:8.1f}")
    for r in results:
        print(f"  {r['layers']}-layer run: {r['rows']} rows, computed {r['computed']}, cached {r['cached']}, "
              f"errors {r['errors']}, {r['workers']} workers; high-water mark reset to baseline: {r['hwm_reset']} "
              f"(VmHWM {r['hwm_before_reset_kb'] / 1024:.0f} -> {r['hwm_after_reset_kb'] / 1024:.0f} MiB); "
              f"{r['samples']} RSS samples; RSS after the run {r['final_rss'] / MiB:.0f} MiB")
    small, large = results
    growth = large["delta"] / small["delta"] if small["delta"] > 0 else float("nan")
    ok = all(r["delta"] <= r["bound"] for r in results)
    print(f"\n  model size ratio (params) {large['n_params'] / small['n_params']:.2f}x; "
          f"(peak-base) ratio {large['layers']}-layer / {small['layers']}-layer = {growth:.2f}  "
          f"(1.0 = does not grow with model size)")
    print(f"  bound 4 x largest float32 matrix: {'PASS' if ok else 'FAIL'} for both sizes "
          f"(worst {max(r['delta'] / r['bound'] for r in results):.3f} of the bound)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
