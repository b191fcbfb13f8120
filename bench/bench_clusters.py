"""Token clusters: the fitting path against the previous one (silhouette distances per k), in ONE process.

  (a) before   the path as it was before issue 16, kept here verbatim as the baseline
               (``cluster_rows_all_rows``): every k fitted on all rows, the silhouette's 5000-row
               cosine distances recomputed for every k.
  (b) after    ``layerscope.weights.clusters.cluster_rows``: the same fits, the silhouette
               distances computed once.

Agreement: the chosen k must be equal and the labelings identical (adjusted Rand index 1.0; two
seeds of the old path are printed as the yardstick of k-means' own non-uniqueness). Matrices:
MiniLM's 30522×384 token embedding and, with ``--llama``, the 32000×2048 one of the synthetic 308M
checkpoint. ``--run-share`` times ``layerscope.run`` on the 308M checkpoint and prints the
clusters stage's share (target <= 25 %). Target after/before <= 0.5 on the 308M embedding.
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
TARGET_ARI = 0.999
TARGET_SHARE = 0.25


def cluster_rows_all_rows(x: torch.Tensor, ks, seed: int = 0, silhouette_sample: int = 5000):
    """The fitting path before issue 16 (selection by silhouette), returning (chosen k, labels)."""
    from sklearn.metrics import calinski_harabasz_score, silhouette_score

    x64 = x.to(torch.float64)
    norms = torch.linalg.vector_norm(x64, dim=1)
    valid = torch.nonzero(norms > 0).squeeze(1).numpy()
    xn = (x64[valid] / norms[valid, None]).to(torch.float32).numpy()
    n = len(xn)
    scores, models = [], {}
    for k in [k for k in ks if k < n]:
        model = lc._kmeans(k, n, seed).fit(xn)
        sil = silhouette_score(xn, model.labels_, metric="cosine", sample_size=min(silhouette_sample, n),
                               random_state=seed)
        scores.append((k, float(sil), float(calinski_harabasz_score(xn, model.labels_))))
        models[k] = model
    chosen = max(scores, key=lambda s: s[1])[0]
    return chosen, models[chosen].labels_, scores


def compare(label: str, x: torch.Tensor, ks, seeds_for_yardstick: bool) -> dict:
    from sklearn.metrics import adjusted_rand_score

    t0 = time.perf_counter()
    k_old, labels_old, _ = cluster_rows_all_rows(x, ks, 0)
    t_old = time.perf_counter() - t0
    t0 = time.perf_counter()
    new = lc.cluster_rows(x, ks, 0, with_labels=True)
    t_new = time.perf_counter() - t0
    labels_new = new["labels"]
    ari = adjusted_rand_score(labels_old, labels_new)
    print(f"\n{label}: {x.shape[0]}×{x.shape[1]}, k grid {list(ks)}")
    print(f"  before (all rows every k)  {t_old:8.2f} s   chosen k {k_old}")
    print(f"  after  (sample, one fit)   {t_new:8.2f} s   chosen k {new['chosen_k']}")
    out = {"speed": t_new / t_old, "k_equal": k_old == new["chosen_k"], "ari": ari}
    if seeds_for_yardstick:
        _, labels_seed1, _ = cluster_rows_all_rows(x, [k_old], 1)
        print(f"  yardstick: ARI between the OLD path at seed 0 and seed 1 (k = {k_old}): "
              f"{adjusted_rand_score(labels_old, labels_seed1):.3f}")
    verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    print(f"  after/before time {out['speed']:.3f}  (target <= {TARGET_SPEED}: {verdict(out['speed'] <= TARGET_SPEED)})")
    print(f"  chosen k equal: {out['k_equal']}  ({verdict(out['k_equal'])})")
    print(f"  adjusted Rand index old vs new labels: {ari:.3f}  (target >= {TARGET_ARI}: {verdict(ari >= TARGET_ARI)})")
    return out


def run_share(path: Path) -> None:
    import layerscope
    from rich.console import Console

    with tempfile.TemporaryDirectory() as tmp:
        cfg = layerscope.Config(store=str(Path(tmp) / "s.sqlite"))
        rep = layerscope.run(str(path), cfg, out=Path(tmp) / "out", console=Console(file=open(os.devnull, "w")),
                             quiet=True)
    stages = rep.stage_seconds
    total = sum(stages.values())
    print(f"\nlayerscope run on {path.name}: {total:.1f} s; " + ", ".join(f"{k} {v:.1f}s" for k, v in stages.items()))
    share = stages.get("clusters", 0.0) / total
    print(f"  clusters share of run: {share:.1%}  (target <= {TARGET_SHARE:.0%}: "
          f"{'met' if share <= TARGET_SHARE else 'NOT met'})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama", action="store_true", help="also the 308M checkpoint's 32000×2048 embedding")
    ap.add_argument("--run-share", action="store_true", help="time `layerscope run` on the 308M checkpoint")
    ap.add_argument("--no-yardstick", action="store_true")
    args = ap.parse_args(argv)
    import checkpoints
    from layerscope.sources import open_source

    ks = lc.k_grid((2, 64))
    x = open_source(checkpoints.minilm_dir()).load("embeddings.word_embeddings.weight")
    compare("MiniLM token embedding", x, ks, not args.no_yardstick)
    if args.llama or args.run_share:
        from make_checkpoint import DEFAULT_ROOT, ensure_checkpoint

        path = ensure_checkpoint(DEFAULT_ROOT, n_layers=4, dtype=torch.float32)
        if args.llama:
            x = open_source(path).load("model.embed_tokens.weight")
            compare("308M Llama token embedding", x, ks, False)
        if args.run_share:
            run_share(Path(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
