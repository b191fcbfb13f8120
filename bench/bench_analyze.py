"""Speed of ``layerscope.analyze`` against its floor, WeightWatcher 0.7.x and its own cache.

On the synthetic 4-layer Llama checkpoint (float32 on disk; see make_checkpoint.py), in ONE process:

  (b) floor       for every 2-D float tensor of the checkpoint (embeddings and lm_head included):
                  load it, form the smaller Gram matrix (WᵀW or WWᵀ) in float32, eigvalsh — nothing
                  else; sequential, torch's default thread count.
  (a) layerscope  ``layerscope.analyze(path, store=<fresh temp store>)``, default metrics/config.
  (d) cache       the same call again on the same store: must recompute nothing.
  (c) WeightWatcher  ``WeightWatcher(model=model).analyze()`` on the same weights loaded as a
                  ``LlamaForCausalLM`` in memory (load time reported separately).
  (e) agreement   layerscope's alpha vs WeightWatcher's alpha on the matrices both analysed,
                  joined by tensor name (WW ``longname`` + ".weight").

Every figure is wall seconds (``time.perf_counter``) plus process CPU seconds; ratios are taken
between figures measured in this same process, which is what counts on a noisy shared machine.
Targets: layerscope/floor <= 1.25, WW/layerscope >= 5, layerscope/cache re-run >= 10; each verdict
is "met" or "NOT met", marked NOT COMPARABLE when other processes kept more than ``BUSY_CORES``
cores busy meanwhile (the two-threaded floor then slows down far more than layerscope's
single-threaded workers, so the ratio flatters layerscope). ``bench_precision.py`` gives the
single-threaded stage costs behind the ratio, which a busy machine disturbs less.

Options: ``--small`` (2 layers, d_model 512: a smoke run of well under a minute); ``--repeat N``
(floor and layerscope timed N times interleaved, ratios from each one's fastest repetition;
default 2); ``--breakdown`` (an extra instrumented layerscope run, not used in the ratios, that
reports where its thread time goes); ``--f32`` (also time layerscope with dtype="float32");
``--floor-1thread`` (also time the floor single-threaded); ``--mixed-route`` (also time
layerscope with its certified mixed-precision route on — off by default, see
spectrum.MIXED_ENABLED — interleaved with the others, and compare every metric of both runs:
max relative difference, target <= 1e-4); ``--old-threads`` (also time layerscope with pool
workers NOT calling ``set_worker_threads``, as before issue 16 — with torch 2.13 a thread created
after ``torch.set_num_threads`` takes that count on first use anyway, so both runs use the same
thread counts and differ only by noise); ``--skip-ww``; ``--root DIR``.
Each measurement also prints how many cores OTHER processes kept busy meanwhile (/proc/stat, steal
included) and a "slowdown": a fixed single-threaded matmul probe taken just before and after it,
relative to the fastest probe of the run (1.00 = undisturbed), to tell a slow run from a disturbed
one (host-level contention from other VMs does not show in /proc/stat but does in the probe).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import layerscope  # noqa: E402
from make_checkpoint import DEFAULT_ROOT, checkpoint_files, ensure_checkpoint, warm_page_cache  # noqa: E402

TARGET_FLOOR = 1.25
TARGET_WW = 5.0
TARGET_CACHE = 10.0
#: A verdict is marked not comparable when other processes kept more cores than this busy during
#: either measurement (issue 16: at 1.3–1.7 busy cores the floor took 69–165 s instead of ~12 s).
BUSY_CORES = 0.5


# -- timing helpers -------------------------------------------------------------------------------
def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _system_busy() -> float:
    """CPU-seconds all processes have been busy (from /proc/stat), or nan off Linux."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return math.nan
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / _HZ


_PROBE_A = None


def probe() -> float:
    """Seconds for a fixed single-threaded float64 matmul (best of 3): a CPU-speed probe.

    Contention that /proc/stat cannot see (another VM on the host's sibling hyperthread, memory
    bandwidth) shows up here as a slower probe.
    """
    global _PROBE_A
    if _PROBE_A is None:
        _PROBE_A = torch.randn(768, 768, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best_t = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(4):
                _PROBE_A @ _PROBE_A
            best_t = min(best_t, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return best_t


_PROBES: list[float] = []


class Measure:
    """wall seconds, this process's CPU seconds, the cores other processes kept busy meanwhile, and
    the CPU-speed probe (seconds) taken just before and just after."""

    def __init__(self, wall: float, cpu: float, others: float, probes: tuple[float, float]):
        self.wall, self.cpu, self.others, self.probes = wall, cpu, others, probes

    @property
    def slowdown(self) -> float:
        """mean probe time around this measurement / fastest probe of the whole run (1.00 = undisturbed)."""
        return (sum(self.probes) / 2) / min(_PROBES)


@contextmanager
def timed(into: dict, key: str):
    gc.collect()
    p0 = probe()
    w0, c0, b0 = time.perf_counter(), _cpu(), _system_busy()
    yield
    wall, cpu = time.perf_counter() - w0, _cpu() - c0
    others = max(0.0, (_system_busy() - b0 - cpu) / wall) if wall > 0 else math.nan
    p1 = probe()
    _PROBES.extend((p0, p1))
    into.setdefault(key, []).append(Measure(wall, cpu, others, (p0, p1)))
    print(f"  .. {key}: {wall:.2f}s wall, {cpu:.2f}s cpu, other processes busy {others:.2f} cores, "
          f"probe {p0 * 1e3:.0f}/{p1 * 1e3:.0f} ms", file=sys.stderr, flush=True)


def best(ms: list) -> Measure:
    """The least-disturbed repetition (minimum wall time)."""
    return min(ms, key=lambda m: m.wall)


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


# -- the matrices ---------------------------------------------------------------------------------
def two_d_float_tensors(path: Path) -> list[tuple[Path, str, tuple[int, int]]]:
    """(file, name, shape) of every 2-D floating-point tensor in the checkpoint, in file order."""
    from safetensors import safe_open

    out = []
    for f in checkpoint_files(path):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                shape = tuple(sl.get_shape())
                if len(shape) == 2 and sl.get_dtype() in ("F64", "F32", "F16", "BF16"):
                    out.append((f, name, shape))
    return out


def floor_run(matrices) -> dict:
    """Load each matrix, smaller Gram in float32, eigvalsh. Nothing else; default torch threads."""
    from safetensors import safe_open

    parts = defaultdict(float)
    by_file = defaultdict(list)
    for f, name, _ in matrices:
        by_file[f].append(name)
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt") as st:
            for name in names:
                t0 = time.perf_counter()
                w = st.get_tensor(name).to(torch.float32)
                t1 = time.perf_counter()
                g = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
                t2 = time.perf_counter()
                lam = torch.linalg.eigvalsh(g)
                t3 = time.perf_counter()
                parts["load"] += t1 - t0
                parts["gram"] += t2 - t1
                parts["eigvalsh"] += t3 - t2
                del w, g, lam
    return dict(parts)


# -- layerscope -----------------------------------------------------------------------------------
def run_layerscope(path: Path, store: Path, **overrides):
    return layerscope.analyze(str(path), store=str(store), **overrides)


def fallback_count(table) -> int:
    """Matrices whose κ exceeds layerscope's Gram limit, i.e. that took the float64 SVD route."""
    from layerscope.weights.spectrum import GRAM_MAX_CONDITION

    if "condition_number" not in table:
        return -1
    return int((table["condition_number"].astype(float) > GRAM_MAX_CONDITION).sum())


# -- instrumented breakdown (separate, extra run) -------------------------------------------------
class _Acc:
    def __init__(self):
        self.lock = threading.Lock()
        self.sec = defaultdict(float)
        self.count = defaultdict(int)

    def add(self, key, dt, n=1):
        with self.lock:
            self.sec[key] += dt
            self.count[key] += n


def breakdown_run(path: Path, store: Path) -> tuple[float, _Acc]:
    """Run analyze with timers wrapped around its stages (monkeypatched in THIS process only)."""
    import layerscope.weights.metrics.powerlaw as lp
    import layerscope.pipeline as lpipe
    import layerscope.sources.base as lbase
    import layerscope.weights.spectrum as lspec
    import layerscope.store as lstore

    acc = _Acc()
    saved = []

    def wrap(owner, attr, key, post=None):
        orig = getattr(owner, attr)
        saved.append((owner, attr, orig))

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = orig(*a, **k)
            acc.add(key, time.perf_counter() - t0)
            if post:
                post(out)
            return out

        setattr(owner, attr, wrapper)

    def count_method(out):
        acc.add("method:" + out.method, 0.0)

    src = layerscope.open_source(str(path))
    wrap(src, "load", "read file (readinto)")
    wrap(lbase, "content_hash", "content hash")
    wrap(lpipe, "moments", "moments (float64 chunks)")
    wrap(lspec, "_gram", "gram matrix")
    wrap(lspec, "_singular_values_on", "spectrum total (gram+eig/svd)", post=count_method)
    wrap(lp, "fit_powerlaw", "power-law fit")
    wrap(lpipe._Runner, "_compute", "compute total (moments+spectrum+metrics)")
    wrap(lstore.Store, "put", "store.put (sqlite)")
    wrap(lstore.Store, "get", "store.get (sqlite)")
    wrap(lstore.Store, "hash_for", "store.hash_for (sqlite)")
    try:
        t0 = time.perf_counter()
        layerscope.analyze(src, store=str(store))
        wall = time.perf_counter() - t0
    finally:
        for owner, attr, orig in reversed(saved):
            setattr(owner, attr, orig)
    return wall, acc


def print_breakdown(wall: float, acc: _Acc, workers: int) -> None:
    s = acc.sec
    spectrum = s.get("spectrum total (gram+eig/svd)", 0.0)
    gram = s.get("gram matrix", 0.0)
    compute = s.get("compute total (moments+spectrum+metrics)", 0.0)
    moments = s.get("moments (float64 chunks)", 0.0)
    rows = [
        ("read file (readinto)", s.get("read file (readinto)", 0.0)),
        ("content hash", s.get("content hash", 0.0)),
        ("moments (float64 chunks)", moments),
        ("gram matrix (float32 mixed or float64)", gram),
        ("eigvalsh, error bound, fallbacks", spectrum - gram),
        ("metrics (power-law fit etc.)", compute - moments - spectrum),
        ("  of which power-law fit", s.get("power-law fit", 0.0)),
        ("sqlite store (get/put/hash_for)", s.get("store.put (sqlite)", 0.0) + s.get("store.get (sqlite)", 0.0)
         + s.get("store.hash_for (sqlite)", 0.0)),
    ]
    total_thread = wall * workers
    print(f"\nlayerscope time breakdown (instrumented extra run, {workers} worker threads; wall {wall:.2f}s,"
          f" {total_thread:.1f} worker-thread-seconds available)")
    print(f"  {'stage':36s} {'thread-s':>9s} {'% of wall×workers':>18s}")
    accounted = 0.0
    for label, sec in rows:
        if not label.startswith("  "):
            accounted += sec
        print(f"  {label:36s} {sec:9.2f} {100 * sec / total_thread:17.1f}%")
    print(f"  {'(idle / unaccounted)':36s} {total_thread - accounted:9.2f} {100 * (total_thread - accounted) / total_thread:17.1f}%")
    methods = {k.split(":", 1)[1]: v for k, v in acc.count.items() if k.startswith("method:")}
    print(f"  spectrum routes: {methods}")


# -- WeightWatcher --------------------------------------------------------------------------------
def ww_reasons(shape: tuple[int, int]) -> str:
    """Why WW 0.7's layer_supported() would reject a matrix with its default limits."""
    from weightwatcher.constants import DEFAULT_MAX_EVALS, DEFAULT_MAX_N, DEFAULT_MIN_EVALS

    n, m = max(shape), min(shape)
    why = []
    if m < DEFAULT_MIN_EVALS:
        why.append(f"M={m} < min_evals {DEFAULT_MIN_EVALS}")
    if m > DEFAULT_MAX_EVALS:
        why.append(f"M={m} > max_evals {DEFAULT_MAX_EVALS}")
    if n > DEFAULT_MAX_N:
        why.append(f"N={n} > max_N {DEFAULT_MAX_N}")
    return "; ".join(why) or "(not an nn.Linear/nn.Embedding WW recognises)"


def run_ww(path: Path, times: dict):
    import logging

    import transformers
    from transformers import LlamaForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    with timed(times, "WW: load LlamaForCausalLM (not in WW figure)"):
        model = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        model.eval()
    with timed(times, "WW analyze"):
        details = ww.WeightWatcher(model=model).analyze()
    del model
    gc.collect()
    return details


# -- main -----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="2-layer d_model 512 variant (smoke run)")
    ap.add_argument("--root", default=DEFAULT_ROOT, help=f"checkpoint cache folder (default {DEFAULT_ROOT})")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 4, 2 with --small)")
    ap.add_argument("--repeat", type=int, default=2,
                    help="floor and layerscope are timed this many times, interleaved; ratios use each one's "
                         "fastest repetition (default 2)")
    ap.add_argument("--skip-ww", action="store_true")
    ap.add_argument("--f32", action="store_true", help='also time layerscope with dtype="float32" (informative)')
    ap.add_argument("--floor-1thread", action="store_true",
                    help="also time the floor with torch.set_num_threads(1) (informative)")
    ap.add_argument("--breakdown", action="store_true", help="extra instrumented run: where layerscope's time goes")
    ap.add_argument("--old-threads", action="store_true",
                    help="also time layerscope with pool workers keeping torch's default thread count (before issue 16)")
    ap.add_argument("--mixed-route", action="store_true",
                    help="also time layerscope with the (default-off) certified mixed-precision route on, "
                         "interleaved with the others, and compare every metric with the default run")
    args = ap.parse_args(argv)

    n_layers = args.layers or (2 if args.small else 4)
    path = ensure_checkpoint(args.root, n_layers=n_layers, dtype=torch.float32, small=args.small)
    nbytes = warm_page_cache(path)
    matrices = two_d_float_tensors(path)
    n_params = sum(a * b for _, _, (a, b) in matrices)
    print(f"checkpoint: {path}\n  {len(matrices)} 2-D float32 matrices, {n_params:,} parameters in them, "
          f"{nbytes / 1e9:.2f} GB of files (page cache warmed)")
    print(f"  torch {torch.__version__}, default torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"layerscope workers {layerscope.Config().resolved_workers()}, loadavg at start {loadavg()}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="layerscope-bench-"))
    times: dict[str, list[Measure]] = {}
    info: dict[str, object] = {}
    floor_parts: list[dict] = []
    details = None
    try:
        for rep in range(args.repeat):
            # (b) floor
            with timed(times, "floor (float32 Gram + eigvalsh)"):
                floor_parts.append(floor_run(matrices))
            # (a) layerscope, fresh store each repetition
            store = tmp / f"a{rep}.sqlite"
            with timed(times, "layerscope analyze (fresh store)"):
                res_a = run_layerscope(path, store)
            info["a"] = (res_a.computed, res_a.cached, res_a.seconds, len(res_a.table), fallback_count(res_a.table))
            if args.old_threads:
                import layerscope.pipeline as lpipe

                saved = lpipe.set_worker_threads
                lpipe.set_worker_threads = lambda count: None
                try:
                    with timed(times, "layerscope, workers at default threads [extra]"):
                        run_layerscope(path, tmp / f"threads-{rep}.sqlite")
                finally:
                    lpipe.set_worker_threads = saved
            if args.mixed_route:
                import layerscope.weights.spectrum as lspec

                lspec.MIXED_ENABLED = True
                try:
                    with timed(times, "layerscope, mixed route on [extra]"):
                        res_mx = run_layerscope(path, tmp / f"mixed-{rep}.sqlite")
                finally:
                    lspec.MIXED_ENABLED = False
                info["mixed"] = res_mx.table
        table = res_a.table
        # (d) cache re-run, same store as the last (a)
        with timed(times, "layerscope cache re-run (same store)"):
            res_d = run_layerscope(path, store)
        info["d"] = (res_d.computed, res_d.cached, res_d.seconds)
        if args.floor_1thread:
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with timed(times, "floor, 1 torch thread [extra]"):
                    floor_run(matrices)
            finally:
                torch.set_num_threads(before)
        if args.f32:
            with timed(times, "layerscope dtype=float32 [extra]"):
                res_f = run_layerscope(path, tmp / "f32.sqlite", dtype="float32")
            info["f32"] = (res_f.computed, res_f.cached)
        # (c) WeightWatcher
        if not args.skip_ww:
            details = run_ww(path, times)
        if args.breakdown:
            bwall, acc = breakdown_run(path, tmp / "breakdown.sqlite")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # ---- report -----------------------------------------------------------------------------
    FLOOR, LS, CACHE = "floor (float32 Gram + eigvalsh)", "layerscope analyze (fresh store)", "layerscope cache re-run (same store)"
    WW, F32, F1 = "WW analyze", "layerscope dtype=float32 [extra]", "floor, 1 torch thread [extra]"
    print(f"\n=== bench_analyze: {'SMALL ' if args.small else ''}{n_layers}-layer Llama, {len(matrices)} matrices, "
          f"{n_params / 1e6:.0f}M params (float32 on disk); loadavg at end {loadavg()} ===")
    print(f"  {'measurement':46s} {'wall s':>8s} {'cpu s':>8s} {'others':>7s} {'slowdown':>9s}")
    for key, ms in times.items():
        for i, m in enumerate(ms):
            tag = f" #{i + 1}" if len(ms) > 1 else ""
            print(f"  {key + tag:46s} {m.wall:8.2f} {m.cpu:8.2f} {m.others:7.2f} {m.slowdown:9.2f}")
    print("  (others = cores kept busy by OTHER processes/VMs meanwhile, from /proc/stat; slowdown = a fixed\n"
          "   1-thread matmul probe around the measurement vs the fastest probe of the run; 1.00 = undisturbed)")
    fp = min(floor_parts, key=lambda d: sum(d.values()))
    print("  floor parts of its fastest repetition (wall s): " + ", ".join(f"{k} {v:.2f}" for k, v in fp.items()))
    comp, cach, secs, nrows, nfall = info["a"]
    print(f"  layerscope: {nrows} rows, computed {comp}, cached {cach} (identical 1-D norm tensors share a hash), "
          f"result.seconds {secs:.2f}; matrices with condition number > 1e4 (float64 refine/SVD route): {nfall}")
    comp_d, cach_d, secs_d = info["d"]
    print(f"  cache re-run: computed {comp_d}, cached {cach_d}, result.seconds {secs_d:.3f}"
          f"  -> {'OK: recomputed nothing' if comp_d == 0 else 'PROBLEM: recomputed ' + str(comp_d)}")

    print("\n  ratio (fastest repetition of each)         wall      cpu    target   verdict (wall)")

    def ratio_line(label, num, den, target, le):
        a, b = best(times[num]), best(times[den])
        rw = a.wall / b.wall if b.wall > 0 else math.inf
        rc = a.cpu / b.cpu if b.cpu > 0 else math.inf
        ok = rw <= target if le else rw >= target
        tgt = f"{'<=' if le else '>='} {target:<5g}" if target else "  -     "
        verdict = ("met" if ok else "NOT met") if target else "(info)"
        busy = max(a.others, b.others)
        if target and busy > BUSY_CORES:
            # the floor's two-threaded eigvalsh collapses when another process takes a core, which
            # flatters layerscope's single-threaded workers: such a verdict says nothing
            verdict += f" — NOT COMPARABLE: other processes kept {busy:.1f} cores busy"
        print(f"  {label:40s} {rw:8.2f} {rc:8.2f}   {tgt}  {verdict}")

    ratio_line("layerscope / floor", LS, FLOOR, TARGET_FLOOR, True)
    if WW in times:
        ratio_line("WeightWatcher / layerscope", WW, LS, TARGET_WW, False)
    ratio_line("layerscope / cache re-run", LS, CACHE, TARGET_CACHE, False)
    OT = "layerscope, workers at default threads [extra]"
    if OT in times:
        ratio_line("layerscope / layerscope(old threads)", LS, OT, 0, True)
    MX = "layerscope, mixed route on [extra]"
    if MX in times:
        ratio_line("layerscope(mixed route) / floor", MX, FLOOR, TARGET_FLOOR, True)
        ratio_line("layerscope(mixed route) / layerscope", MX, LS, 0, True)
        a64 = table.set_index("name")
        cols = [c for c in table.columns if c not in ("name", "layer", "role", "shape", "dtype", "numel", "error")]
        worst, worst_col = 0.0, ""
        for c in cols:
            x = info["mixed"].set_index("name")[c].astype(float)
            y = a64[c].astype(float).reindex(x.index)
            both = np.isfinite(x) & np.isfinite(y)
            if both.any():
                rel = float((np.abs(x[both] - y[both]) / np.maximum(np.abs(y[both]), 1e-300)).max())
                if rel > worst:
                    worst, worst_col = rel, c
        print(f"  mixed vs float64 route, every metric of every matrix: max relative difference {worst:.2e} ({worst_col}); "
              f"target <= 1e-4: {'PASS' if worst <= 1e-4 else 'FAIL'}")
    if F32 in times:
        ratio_line("layerscope(dtype=float32) / floor", F32, FLOOR, 0, True)
    if F1 in times:
        ratio_line("layerscope / floor(1 thread)", LS, F1, 0, True)
        ratio_line("floor(1 thread) / floor(default threads)", F1, FLOOR, 0, True)

    # ---- WW coverage and (e) alpha agreement --------------------------------------------------
    if details is not None:
        ww_names = {f"{ln}.weight": i for i, ln in zip(details.index, details["longname"])}
        ls_names = {name: shape for _, name, shape in matrices}
        both = [n for n in ls_names if n in ww_names]
        skipped = [n for n in ls_names if n not in ww_names]
        print(f"\n  WeightWatcher 0.7 (defaults) analysed {len(details)} layers = {len(both)} of layerscope's "
              f"{len(ls_names)} matrices; skipped {len(skipped)}" + (":" if skipped else ""))
        for n in skipped:
            print(f"    skipped {n} {ls_names[n]}: {ww_reasons(ls_names[n])}")
        extra = [k for k in ww_names if k not in ls_names]
        if extra:
            print(f"    WW layers with no layerscope matrix: {extra}")
        for n in both:
            if "embed" in n or "lm_head" in n:
                row = details.loc[ww_names[n]]
                print(f"    {n}: analysed by WW as layer_type {row.get('layer_type', '?')} (N={row['N']}, M={row['M']}; "
                      f"WW's default max_N is 50000)")
        t = table.set_index("name")
        pairs = [(n, float(t.loc[n, "alpha"]), float(details.loc[ww_names[n], "alpha"])) for n in both]
        diffs = np.array([abs(a - b) for _, a, b in pairs])
        rel = np.array([abs(a - b) / abs(b) if b else math.inf for _, a, b in pairs])
        print(f"\n  (e) alpha agreement on {len(pairs)} common matrices: max |layerscope - WW| = {diffs.max():.3g}, "
              f"max relative = {rel.max():.3g}, median |diff| = {np.median(diffs):.3g}")
        worst = sorted(pairs, key=lambda p: -abs(p[1] - p[2]))
        show = worst[:3] + [p for p in pairs if p not in worst[:3]][:3]
        print(f"    {'matrix':48s} {'layerscope':>11s} {'WW':>11s}   (3 worst, then 3 others)")
        for n, a, b in show:
            print(f"    {n:48s} {a:11.5f} {b:11.5f}")
        for col in ("log_norm", "log_spectral_norm", "alpha_weighted"):
            if col in t.columns and col in details.columns:
                d = [abs(float(t.loc[n, col]) - float(details.loc[ww_names[n], col])) for n in both]
                print(f"    also {col:18s} max |diff| = {max(d):.3g}")

    if args.breakdown:
        print_breakdown(bwall, acc, layerscope.Config().resolved_workers())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
