"""layerscope's exact all-pairs cosine geometry versus the bare blocked GEMM it is built on.

Matrix: V × d = 50257 × 768 float32 (GPT-2's wte shape), seeded, with structure so that the
threshold/neighbour path is exercised:  x = N(0,1) noise + a rank-16 component (energy ratio
``--lowrank-weight``² : 1) + a shared mean direction (anisotropy, like real embeddings).
``--small``: 6000 × 256, same recipe.

Measured, each configuration (max_memory = 1 GiB, the default, and 256 MiB):

  layerscope   ``cosine_geometry(x, GeometryOptions(max_memory=M))``, end to end: row
               normalisation (float64), isotropy/norm stats, then row blocks [s, s+B) against
               rows [s, V) through one GEMM each, every block reduced by the fused numba kernel.
               Time spent inside ``reduce_block`` (the kernel) is accumulated by a thin wrapper.
  tri GEMM     the raw work alone: ``xn[s:s+B] @ xn[s:].T`` for the same blocks (B read from
               layerscope's ``result["block_rows"]``), on the same normalised float32 rows,
               result dropped, nothing else.
  full XXᵀ     (information, 1 GiB config only) the full, non-triangular blocked product
               ``xn[s:s+B] @ xn.T`` for every block.

Each configuration runs in FRESH subprocesses so nothing allocated earlier counts for memory:
child "ls-first" measures layerscope's peak RSS, then also times the tri GEMM; child
"gemm-first" measures the tri GEMM's peak RSS, then also times layerscope (and, at 1 GiB, the
full XXᵀ). So every layerscope time has a tri-GEMM time from the SAME process next to it; the
reported ratio is Σ layerscope / Σ tri GEMM over both children (per-child ratios are printed too).
Peak RSS = ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the call minus RSS before it
(/proc/self/statm), with the kernel's high-water mark reset to the current RSS first
(``echo 5 > /proc/self/clear_refs``) so warm-ups and matrix construction do not count.

Warm-up (excluded from all timings and from the RSS baseline): one ``cosine_geometry`` call on a
small 512 × 64 matrix (numba JIT / cache load, thread pools) and one small GEMM.

``python bench/bench_embeddings.py [--small] [--threads N]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
import childproc  # noqa: E402  (bench/ is on sys.path when run as a script)

MiB = 1 << 20
GiB = 1 << 30


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_matrix(v: int, d: int, seed: int = 0, rank: int = 16, lowrank_weight: float = 2.0, mean_weight: float = 0.5):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(v, d, generator=g)
    u = torch.randn(v, rank, generator=g)
    b = torch.randn(rank, d, generator=g) / rank**0.5
    x += lowrank_weight * (u @ b)
    x += mean_weight * torch.randn(1, d, generator=g)
    return x.contiguous()


# -- child ----------------------------------------------------------------------------------------
def child(args) -> int:
    import gc

    import torch

    import importlib

    from layerscope.weights.embeddings import GeometryOptions, cosine_geometry

    emb = importlib.import_module("layerscope.weights.embeddings")

    x = make_matrix(args.v, args.d, args.seed)
    # warm-up: numba kernel (JIT or on-disk cache load), numba + torch thread pools, small GEMM
    t0 = time.perf_counter()
    cosine_geometry(make_matrix(512, 64, 1), GeometryOptions())
    warm_s = time.perf_counter() - t0
    _ = torch.randn(256, 64) @ torch.randn(64, 256)

    # normalised rows exactly as layerscope makes them (for the GEMM baselines)
    xn = emb._normalised(x, emb._row_norms(x)[0], torch.float32)[0]
    opts = GeometryOptions(max_memory=args.max_memory)

    kernel = {"s": 0.0, "calls": 0}
    original = emb.reduce_block

    def timed_reduce(*a, **k):
        t = time.perf_counter()
        original(*a, **k)
        kernel["s"] += time.perf_counter() - t
        kernel["calls"] += 1

    def run_layerscope():
        kernel["s"], kernel["calls"] = 0.0, 0
        emb.reduce_block = timed_reduce
        try:
            t = time.perf_counter()
            res = cosine_geometry(x, opts)
            return time.perf_counter() - t, res
        finally:
            emb.reduce_block = original

    def run_tri(block):
        v = xn.shape[0]
        t = time.perf_counter()
        for s in range(0, v - 1, block):
            c = xn[s:s + block] @ xn[s:].T
            del c
        return time.perf_counter() - t

    def run_full(block):
        v = xn.shape[0]
        t = time.perf_counter()
        for s in range(0, v, block):
            c = xn[s:s + block] @ xn.T
            del c
        return time.perf_counter() - t

    def measured(fn):
        gc.collect()
        before = _rss_now()
        reset = _reset_hwm()
        out = fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return out, before, peak, reset

    out: dict = {"mode": args.child, "max_memory": args.max_memory, "warmup_s": warm_s,
                 "threads_torch": torch.get_num_threads()}
    try:
        import numba

        out["threads_numba"] = numba.get_num_threads()
        out["numba_layer"] = numba.threading_layer()
    except Exception:  # noqa: BLE001
        pass
    if args.child == "ls-first":
        (ls_s, res), before, peak, reset = measured(run_layerscope)
        out.update(ls_s=ls_s, kernel_s=kernel["s"], kernel_calls=kernel["calls"], rss_before=before, rss_peak=peak,
                   hwm_reset=reset, block=res["block_rows"],
                   summary={k: res[k] for k in ("pairs", "mean", "std")} | {"pairs_above": res["threshold"]["pairs_above"],
                                                                            "percentiles": res["percentiles"]})
        out["tri_s"] = run_tri(res["block_rows"])
    else:
        block = args.block  # layerscope's result["block_rows"] from the ls-first child of this config
        tri_s, before, peak, reset = measured(lambda: run_tri(block))
        out.update(tri_s=tri_s, rss_before=before, rss_peak=peak, hwm_reset=reset, block=block)
        ls_s, res = run_layerscope()
        out.update(ls_s=ls_s, kernel_s=kernel["s"], kernel_calls=kernel["calls"])
        if res["block_rows"] != block:
            out["block_mismatch"] = res["block_rows"]
        if args.full:
            out["full_s"] = run_full(block)
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def run_child(mode: str, v: int, d: int, max_memory: int, seed: int, full: bool, threads: int | None,
              block: int | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--v", str(v), "--d", str(d),
           "--max-memory", str(max_memory), "--seed", str(seed)] + (["--full"] if full else [])
    if block:
        cmd += ["--block", str(block)]
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads))
    print(f"[bench_embeddings] child {mode} max_memory={max_memory / MiB:.0f} MiB ...", file=sys.stderr, flush=True)
    return childproc.run_child(cmd, env)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="6000 x 256 smoke run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="OMP/numba threads in the children (default: all)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--v", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--d", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--max-memory", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--block", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    v, d = (6000, 256) if args.small else (50257, 768)
    # small: scale max_memory so the blocks are a similar fraction of V as at full size
    configs = [GiB, 256 * MiB] if not args.small else [GiB * (6000 / 50257) ** 2, 256 * MiB * (6000 / 50257) ** 2]
    configs = [int(m) for m in configs]
    results = []
    for i, mm in enumerate(configs):
        a = run_child("ls-first", v, d, mm, args.seed, False, args.threads)
        b = run_child("gemm-first", v, d, mm, args.seed, i == 0, args.threads, a["block"])
        results.append((mm, a, b))

    a0 = results[0][1]
    print(f"\n=== bench_embeddings: exact all-pairs cosine geometry vs raw blocked GEMM "
          f"({'SMALL ' if args.small else ''}{v} x {d} float32) ===")
    print(f"  matrix       seeded N(0,1) + rank-16 component (weight 2) + shared mean direction (weight 0.5); "
          f"mean cos {a0['summary']['mean']:.4f}, std {a0['summary']['std']:.4f}, pairs {a0['summary']['pairs']:,}, "
          f"pairs > 0.7: {a0['summary']['pairs_above']:,}")
    print(f"  threads      torch {a0['threads_torch']}, numba {a0.get('threads_numba')} "
          f"({a0.get('numba_layer')} layer), cores {os.cpu_count()}")
    print(f"  warm-up      one cosine_geometry call on 512 x 64 + one small GEMM per process, excluded "
          f"(took {a0['warmup_s']:.2f}s in the first child)")
    print(f"  timing       each row: two fresh processes; layerscope and tri GEMM timed in BOTH (same-process pairs)")
    hdr = (f"  {'max_memory':>10s} {'block':>6s} {'child':>10s} {'layerscope':>10s} {'kernel':>7s} {'tri GEMM':>9s} "
           f"{'ratio':>6s} {'full XXT':>9s}")
    print(hdr)
    print(f"  {'(MiB)':>10s} {'rows':>6s} {'':>10s} {'(s)':>10s} {'(s)':>7s} {'(s)':>9s} {'ls/tri':>6s} {'(s)':>9s}")
    summary = []
    for mm, a, b in results:
        for c in (a, b):
            print(f"  {mm / MiB:10.0f} {c['block']:6d} {c['mode']:>10s} {c['ls_s']:10.2f} {c['kernel_s']:7.2f} "
                  f"{c['tri_s']:9.2f} {c['ls_s'] / c['tri_s']:6.3f} "
                  f"{(format(c['full_s'], '9.2f') if 'full_s' in c else '-'):>9s}")
        ls, tri = a["ls_s"] + b["ls_s"], a["tri_s"] + b["tri_s"]
        summary.append((mm, a, b, ls / tri))
        print(f"  {mm / MiB:10.0f} {a['block']:6d} {'COMBINED':>10s} {ls / 2:10.2f} {(a['kernel_s'] + b['kernel_s']) / 2:7.2f} "
              f"{tri / 2:9.2f} {ls / tri:6.3f}   <- RATIO (target <= 1.2: {'PASS' if ls / tri <= 1.2 else 'FAIL'})")
    full = results[0][2].get("full_s")
    if full:
        tri0 = (results[0][1]["tri_s"] + results[0][2]["tri_s"]) / 2
        print(f"  full (non-triangular) blocked XXT at block {results[0][2]['block']}: {full:.2f}s = "
              f"{full / tri0:.2f}x the triangular GEMM")

    print(f"\n  peak RSS, each measured first thing in a fresh process (ru_maxrss - RSS before; HWM reset)")
    print(f"  {'max_memory':>10s} {'block':>6s} {'block f32':>10s} {'run':>12s} {'RSS before':>11s} {'peak':>8s} "
          f"{'peak-before':>12s} {'/max_memory':>12s}")
    print(f"  {'(MiB)':>10s} {'rows':>6s} {'(MiB)':>10s} {'':>12s} {'(MiB)':>11s} {'(MiB)':>8s} {'(MiB)':>12s}")
    for mm, a, b, _ in summary:
        blk = a["block"] * v * 4 / MiB
        for c, name in ((a, "layerscope"), (b, "tri GEMM")):
            delta = c["rss_peak"] - c["rss_before"]
            print(f"  {mm / MiB:10.0f} {c['block']:6d} {blk:10.0f} {name:>12s} {c['rss_before'] / MiB:11.0f} "
                  f"{c['rss_peak'] / MiB:8.0f} {delta / MiB:12.0f} {delta / mm:12.2f}")
    if not all(c["hwm_reset"] for _, a, b, _ in summary for c in (a, b)):
        print("  WARNING: could not reset the RSS high-water mark; peaks may include earlier allocations")
    x_mib = v * d * 4 / MiB
    print(f"  (input x float32 = {x_mib:.0f} MiB, already resident before the call; layerscope also holds the "
          f"normalised float32 rows ({x_mib:.0f} MiB) and float64 chunks of 8192 rows ({8192 * d * 8 / MiB:.0f} MiB) "
          f"beside the block of cosines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
