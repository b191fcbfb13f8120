"""Token clusters: the sampled procedure against the all-rows one it replaced (issue 16), in ONE process.

  (a) before   the path as it was before this change (main at 4b6f6c0), kept here verbatim as the
               baseline (``cluster_rows_all_rows``): every k of the grid fitted on ALL rows
               (MiniBatchKMeans above 20000 rows, scikit-learn's default threads), silhouette on
               5000 seeded rows whose cosine distances are computed once.
  (b) after    ``layerscope.weights.clusters.cluster_rows``: every k fitted on a seeded 5000-row
               sample (the silhouette's rows; top 512 principal components of the sample when wider
               than 512), every row assigned to the sample fit's nearest centroid for CH and inertia,
               the chosen k alone fitted on every row (at most 20 Lloyd iterations), one thread.

Agreement on MiniLM (the claim that the chosen k and the clusters stay "essentially the same"): the
chosen k must be equal, and the adjusted Rand index between the old and new labelings must be at
least 0.9 × the yardstick, the ARI between the OLD path at seed 0 and at seed 1 at the same k (k-means
partitions of MiniLM's near-isotropic vocabulary are not unique: the old path itself only agrees
with itself that far; its seed-1 grid is run in full and its own chosen k printed). NMI beside it.
Matrices: MiniLM's 30522×384 token embedding and, with ``--llama``, the 32000×2048 one of the synthetic
308M checkpoint (random weights: no agreement target there, nothing to agree on). ``--run-share``
times ``layerscope.run`` on the 308M checkpoint (built once under /tmp by make_checkpoint.py) and
prints the clusters stage's share (target <= 25 %), and, with ``--llama``, the share the old
procedure would have had (its time measured above in place of the stage's).
Target after/before <= 0.5 on each matrix.

    PYTHONPATH=src python bench/bench_clusters.py [--llama] [--run-share]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from layerscope.weights import clusters as lc  # noqa: E402

TARGET_SPEED = 0.5
TARGET_ARI_OF_YARDSTICK = 0.9
TARGET_SHARE = 0.25


_KEPT: dict = {}
OLD_THREADS = None  # --old-threads


def cluster_rows_all_rows(x: torch.Tensor, ks, seed: int = 0, silhouette_sample: int = 5000, keep=()):
    """The fitting path before this change (main at 4b6f6c0, selection by silhouette), returning
    (chosen k, labels, scores); the labels at the k in ``keep`` are left in ``_KEPT``."""
    from sklearn.metrics import calinski_harabasz_score, silhouette_score
    from sklearn.metrics.pairwise import cosine_distances

    x64 = x.to(torch.float64)
    norms = torch.linalg.vector_norm(x64, dim=1)
    valid = torch.nonzero(norms > 0).squeeze(1).numpy()
    xn = (x64[valid] / norms[valid, None]).to(torch.float32).numpy()
    n = len(xn)
    sil_rows = np.random.RandomState(seed).permutation(n)[:min(silhouette_sample, n)]
    sil_distances = cosine_distances(xn[sil_rows])
    scores, models = [], {}
    for k in [k for k in ks if k < n]:
        model = lc._kmeans(k, n, seed).fit(xn)
        sil = silhouette_score(sil_distances, model.labels_[sil_rows], metric="precomputed")
        scores.append((k, float(sil), float(calinski_harabasz_score(xn, model.labels_))))
        models[k] = model
        if k in keep:
            _KEPT[k] = model.labels_
    chosen = max(scores, key=lambda s: s[1])[0]
    return chosen, models[chosen].labels_, scores


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def compare(label: str, x: torch.Tensor, ks, yardstick: bool) -> dict:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    with threadpool_limits(OLD_THREADS):  # None: scikit-learn's default, as the old code ran
        k_old, labels_old, _ = cluster_rows_all_rows(x, ks, 0)
    t_old = time.perf_counter() - t0
    t0 = time.perf_counter()
    new = lc.cluster_rows(x, ks, 0, with_labels=True)
    t_new = time.perf_counter() - t0
    labels_new = new["labels"]
    ari = adjusted_rand_score(labels_old, labels_new)
    nmi = normalized_mutual_info_score(labels_old, labels_new)
    print(f"\n{label}: {x.shape[0]}×{x.shape[1]}, k grid {list(ks)}; load average {os.getloadavg()[0]:.1f}")
    threads = "default threads" if OLD_THREADS is None else f"{OLD_THREADS} thread(s)"
    print(f"  before (all rows, every k; {threads})    {t_old:8.2f} s   chosen k {k_old}")
    print(f"  after  (sample, one full fit) {t_new:8.2f} s   chosen k {new['chosen_k']}   {new['fit']}")
    out = {"speed": t_new / t_old, "k_equal": k_old == new["chosen_k"], "ari": ari, "t_old": t_old, "t_new": t_new}
    print(f"  after/before time {out['speed']:.3f}  (target <= {TARGET_SPEED}: {_verdict(out['speed'] <= TARGET_SPEED)})")
    if not yardstick:
        why = "random weights" if "Llama" in label else "no yardstick run"
        print(f"  chosen k equal: {out['k_equal']}; ARI old vs new {ari:.3f}, NMI {nmi:.3f} (no target: {why})")
        return out
    k_seed1, _, _ = cluster_rows_all_rows(x, ks, 1, keep=[k_old])
    labels_seed1 = _KEPT[k_old]
    stick = adjusted_rand_score(labels_old, labels_seed1)
    stick_nmi = normalized_mutual_info_score(labels_old, labels_seed1)
    print(f"  yardstick: the OLD path at seed 1 chooses k = {k_seed1}; at k = {k_old} its labels against seed 0's: "
          f"ARI {stick:.3f}, NMI {stick_nmi:.3f}")
    print(f"  chosen k equal: {out['k_equal']}  ({_verdict(out['k_equal'])})")
    bound = TARGET_ARI_OF_YARDSTICK * stick
    print(f"  ARI old vs new labels: {ari:.3f}, NMI {nmi:.3f}  (target ARI >= {TARGET_ARI_OF_YARDSTICK} × yardstick "
          f"= {bound:.3f}: {_verdict(ari >= bound)})")
    return out


def run_share(path: Path, old_seconds: float | None) -> None:
    from rich.console import Console

    from layerscope import Config
    from layerscope.run import run

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config(store=str(Path(tmp) / "s.sqlite"))
        rep = run(str(path), cfg, out=Path(tmp) / "out", console=Console(file=open(os.devnull, "w")),
                             quiet=True)
    stages = rep.stage_seconds
    total = sum(stages.values())
    print(f"\nlayerscope run on {path.name}: {total:.1f} s (load average {os.getloadavg()[0]:.1f}); "
          + ", ".join(f"{k} {v:.1f}s" for k, v in stages.items()))
    share = stages.get("clusters", 0.0) / total
    print(f"  clusters share of run: {share:.1%}  (target <= {TARGET_SHARE:.0%}: {_verdict(share <= TARGET_SHARE)})")
    if old_seconds is not None:
        others = total - stages.get("clusters", 0.0)
        print(f"  with the old procedure's time on this matrix ({old_seconds:.1f} s, measured before) in place of the "
              f"stage: {old_seconds / (others + old_seconds):.1%}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama", action="store_true", help="also the 308M checkpoint's 32000×2048 embedding")
    ap.add_argument("--run-share", action="store_true", help="time `layerscope run` on the 308M checkpoint")
    ap.add_argument("--no-yardstick", action="store_true", help="skip the old path's seed-1 grid on MiniLM")
    ap.add_argument("--old-threads", type=int, help="run the old procedure with this many threads (default: "
                    "scikit-learn's, as the old code did); 1 separates the single thread's gain from the sample's")
    ap.add_argument("--skip-minilm", action="store_true", help="leave out the MiniLM comparison")
    ap.add_argument("--old-seconds", type=float, help="the old procedure's time on the 308M embedding from an "
                    "earlier --llama run, for the share it would have had (with --run-share, without --llama)")
    args = ap.parse_args(argv)
    global OLD_THREADS
    OLD_THREADS = args.old_threads
    import checkpoints
    from layerscope.sources import open_source

    ks = lc.k_grid((2, 64))
    if not args.skip_minilm:
        x = open_source(checkpoints.minilm_dir()).load("embeddings.word_embeddings.weight")
        compare("MiniLM token embedding", x, ks, not args.no_yardstick)
    if args.llama or args.run_share:
        from make_checkpoint import DEFAULT_ROOT, ensure_checkpoint

        path = ensure_checkpoint(DEFAULT_ROOT, n_layers=4, dtype=torch.float32)
        old_seconds = args.old_seconds
        if args.llama:
            x = open_source(path).load("model.embed_tokens.weight")
            old_seconds = compare("308M Llama token embedding", x, ks, False)["t_old"]
            del x
        if args.run_share:
            run_share(Path(path), old_seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
