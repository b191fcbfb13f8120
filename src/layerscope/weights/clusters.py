"""Token clusters: k-means on normalised embedding rows over a range of k, decoded to text.

k is chosen by the silhouette (cosine, on a seeded sample of rows) unless ``selection`` asks for the
Calinski–Harabasz index (on all rows) or the inertia elbow; all three are reported beside the choice
so a reader can judge it. The silhouette is the default because Calinski–Harabasz favours small k on
embedding matrices (MiniLM: k = 2, the ``[unused…]`` tokens against the rest). Large
vocabularies use MiniBatchKMeans. Everything is seeded, so a run is reproducible.

Above FIT_SAMPLE rows every k is fitted on a seeded row sample and only the chosen k on every row:
fitting 12 k on all 32000 × 2048 rows was most of ``layerscope run``. The sample fits use the
estimator the full vocabulary would (MiniBatchKMeans above 20000 rows): an earlier try that fitted
the sample with Lloyd's KMeans chose k = 13 on MiniLM where the full fits choose 25; with the same
estimator the choice stays 25. The silhouette sample's cosine distances are computed once for every
k. Each matrix is clustered on its own: position embeddings are never mixed into token clusters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ..anatomy import Anatomy, build_anatomy
from ..config import Config
from .embeddings import Vocabulary
from ..errors import LayerscopeError
from ..sources import Source, open_source
from ..store import Store
from .untrained import Untrained, untrained_rows

MINIBATCH_ABOVE = 20_000  # rows; above this, MiniBatchKMeans
CLUSTERS_VERSION = "2"  # 2: above FIT_SAMPLE rows, k chosen on a row sample, one full fit


def k_grid(k_range: tuple[int, int], points: int = 12) -> list[int]:
    lo, hi = k_range
    if lo < 2 or hi < lo:
        raise LayerscopeError(f"--k-range: need 2 <= low <= high, got {lo}..{hi}")
    return sorted({int(round(k)) for k in np.geomspace(lo, hi, num=min(points, hi - lo + 1))})


def parse_k_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(p) for p in text.replace("-", "..").split(".."))
    except ValueError:
        raise LayerscopeError(f"--k-range: expected LOW..HIGH such as 2..64, got {text!r}") from None
    return lo, hi


def elbow(ks: Sequence[int], inertia: Sequence[float]) -> int:
    """The k farthest below the straight line from the first to the last (log k, inertia) point."""
    x = np.log(np.asarray(ks, dtype=float))
    y = np.asarray(inertia, dtype=float)
    if len(x) < 3:
        return int(ks[0])
    xn = (x - x[0]) / (x[-1] - x[0])
    yn = (y - y[-1]) / max(y[0] - y[-1], 1e-300)
    return int(ks[int(np.argmax((1 - xn) - yn))])


SILHOUETTE_MIN = 0.25
ELBOW_RATIO = 2.0
VERDICT_RULE = (
    f"Cluster structure is claimed only when the best silhouette over the k tried is at least {SILHOUETTE_MIN:g} "
    "(Kaufman & Rousseeuw: below 0.25 'no substantial structure has been found'); otherwise the clusters are a "
    "partition of the vocabulary, not evidence of groups. An elbow is claimed at k only when the inertia falls at "
    f"least {ELBOW_RATIO:g}× faster before k than after it (slopes against log k, k strictly inside the range tried)."
)


def elbow_ratio(ks: Sequence[int], inertia: Sequence[float], k: int) -> float:
    """Slope of inertia against log k before ``k`` over the slope after it (inf when flat after)."""
    x = np.log(np.asarray(ks, dtype=float))
    y = np.asarray(inertia, dtype=float)
    i = list(ks).index(k)
    if i == 0 or i == len(ks) - 1:
        return float("nan")
    before = (y[0] - y[i]) / (x[i] - x[0])
    after = (y[i] - y[-1]) / (x[-1] - x[i])
    if after <= 0:
        return float("inf") if before > 0 else float("nan")
    return float(before / after)


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    """Whether the scores show cluster structure and an elbow, by ``VERDICT_RULE`` (from stored scores)."""
    scores = result["scores"]
    best = max(scores, key=lambda s: s["silhouette"])
    ratio = elbow_ratio([s["k"] for s in scores], [s["inertia"] for s in scores], result["elbow_k"])
    return {"best_silhouette": float(best["silhouette"]), "best_silhouette_k": int(best["k"]),
            "structure": bool(best["silhouette"] >= SILHOUETTE_MIN), "elbow_ratio": ratio,
            "elbow_claimed": bool(np.isfinite(ratio) and ratio >= ELBOW_RATIO) or ratio == float("inf"),
            "rule": VERDICT_RULE}


def _kmeans(k: int, n_rows: int, seed: int):
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if n_rows > MINIBATCH_ABOVE:
        return MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=4096, n_init=3, max_no_improvement=20)
    return KMeans(n_clusters=k, random_state=seed, n_init=4)


SELECTIONS = ("calinski_harabasz", "silhouette", "elbow")
#: Above this many rows, each k is fitted on a seeded sample of this many rows (the silhouette's rows
#: are its first ``silhouette_sample``), and only the chosen k is fitted on every row.
FIT_SAMPLE = 5000
#: Above this width the sample fits run on the sample's top principal components, max(this, 8 × the
#: largest k) of them: the top ⌈k/ε⌉ components preserve every k-clustering's cost within 1 ± ε
#: (Cohen et al. 2015, "Dimensionality reduction for k-means"), so ε ≤ 1/8 here.
PCA_ABOVE = 512
#: The full-vocabulary fit: Lloyd iterations from the sample's centroids, stopped by scikit-learn's
#: rule (labels unchanged, or the centres' squared shift below REFINE_TOL × the mean feature variance)
#: or after REFINE_MAX_ITER iterations.
REFINE_MAX_ITER = 20
REFINE_TOL = 1e-4
STOPPING_RULE = (f"Lloyd iterations on every row from the sample fit's centroids until no label changes or the "
                 f"centres' squared shift is below {REFINE_TOL:g} × the mean feature variance, at most {REFINE_MAX_ITER}")


def _pca_basis(xs: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, d × r basis) of the sample's top principal components, or None when the width is small."""
    m, d = xs.shape
    components = min(components, m - 1)  # the centred sample spans at most m - 1 directions
    if d <= components:
        return None
    mean = xs.mean(axis=0)
    c = xs - mean
    if d <= m:  # eigenvectors of the smaller Gram matrix: d × d here, m × m for very wide matrices
        _, v = np.linalg.eigh((c.T @ c).astype(np.float64))
        basis = v[:, ::-1][:, :components]
    else:
        w, u = np.linalg.eigh((c @ c.T).astype(np.float64))
        w, u = w[::-1][:components], u[:, ::-1][:, :components]
        keep = w > w[0] * 1e-10  # directions the sample really spans
        basis = np.linalg.qr(c.T.astype(np.float64) @ u[:, keep])[0]  # orthonormal despite the float32 Gram
    return mean, np.ascontiguousarray(basis).astype(np.float32)


def _nearest(xn: np.ndarray, row_sq: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, float]:
    """Each row's nearest centre (squared Euclidean; ``row_sq``: the rows' squared norms) and the
    summed squared distance (the inertia)."""
    d2 = (centres * centres).sum(axis=1)[None, :] - 2.0 * (xn @ centres.T)
    labels = np.argmin(d2, axis=1)
    return labels, float(np.maximum(row_sq + d2[np.arange(len(xn)), labels], 0.0).sum())


def calinski_harabasz(xn64: np.ndarray, labels: np.ndarray, sum_sq: float | None = None) -> float:
    """scikit-learn's Calinski–Harabasz index from float64 cluster sums (a sparse one-hot product):
    between / within dispersion, each over its degrees of freedom. sklearn's own loop copies every
    cluster's rows; on a 32000 × 2048 vocabulary it took longer than the 12 sample fits together."""
    from scipy.sparse import csr_matrix

    n = len(xn64)
    present, labels = np.unique(labels, return_inverse=True)
    k = len(present)
    if k < 2 or k >= n:
        raise LayerscopeError(f"clusters: the Calinski–Harabasz index needs 2 <= labels < rows, got {k}")
    onehot = csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(k, n))
    sums = np.asarray(onehot @ xn64)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    between_means = float(((sums * sums).sum(axis=1) / counts).sum())  # sum over clusters of n_c |mean_c|^2
    total = xn64.sum(axis=0)
    within = (float(np.einsum("ij,ij->", xn64, xn64)) if sum_sq is None else sum_sq) - between_means
    between = between_means - float(total @ total) / n
    return 1.0 if within == 0.0 else float(between * (n - k) / (within * (k - 1.0)))


def cluster_rows(x: torch.Tensor, ks: Sequence[int], seed: int = 0, silhouette_sample: int = 5000,
                 representatives: int = 8, selection: str = "silhouette",
                 progress: Callable[[int, int], None] | None = None, with_labels: bool = False,
                 fit_sample: int = FIT_SAMPLE) -> dict[str, Any]:
    """k-means over ``ks`` on the normalised rows of ``x``; the chosen clustering with its members.

    Up to ``fit_sample`` rows (at least 10 × the largest k) every k is fitted on every row. Above
    it, every k is fitted on a seeded sample of that many rows (the silhouette's rows are its first
    ones; the estimator is the one the vocabulary size calls for, ``_kmeans``), every row is
    assigned to that fit's nearest centroid for the Calinski–Harabasz index and the inertia, and
    only the chosen k is fitted on every row (``STOPPING_RULE``). Fitting all 12 k on a 32000 × 2048 vocabulary was most of
    ``layerscope run``; the k it chose on MiniLM and its clusters are those of the full fits (within
    k-means' own seed-to-seed spread: bench/bench_clusters.py).
    ``with_labels``: also return every non-zero row's cluster (``labels``; for comparisons, not stored)."""
    from threadpoolctl import threadpool_limits

    # One thread: k-means is many short OpenMP regions, and with more threads than free cores
    # libgomp's spin-waiting made each fit 5-10× slower (MiniBatchKMeans, k = 25 on 5000 × 2048:
    # 46.6 s with 2 threads, 10.0 s with 1, on 2 cores at load average 8).
    with threadpool_limits(1):
        return _cluster_rows(x, ks, seed, silhouette_sample, representatives, selection, progress, with_labels,
                             fit_sample)


def _cluster_rows(x, ks, seed, silhouette_sample, representatives, selection, progress, with_labels, fit_sample):
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score
    from sklearn.metrics.pairwise import cosine_distances

    x64 = x.to(torch.float64)
    norms = torch.linalg.vector_norm(x64, dim=1)
    valid = torch.nonzero(norms > 0).squeeze(1).numpy()
    xn64 = (x64[valid] / norms[valid, None]).numpy()
    del x64
    xn = xn64.astype(np.float32)
    n = len(xn)
    row_sq = np.einsum("ij,ij->i", xn, xn)
    sum_sq = float(np.einsum("ij,ij->", xn64, xn64))
    ks = [k for k in ks if k < n]
    if not ks:
        raise LayerscopeError(f"clusters: {n} rows are too few for the requested k")
    # The silhouette's rows are the same for every k (sklearn draws them from ``seed``): their
    # cosine distances are computed once, not once per k. The fit sample starts with the same rows.
    perm = np.random.RandomState(seed).permutation(n)
    sil_rows = perm[:min(silhouette_sample, n)]
    sil_distances = cosine_distances(xn[sil_rows])
    fit_sample = max(fit_sample, 10 * max(ks))  # at least 10 sample rows per cluster on average
    sampled = n > fit_sample
    xs = xn[perm[:fit_sample]] if sampled else xn
    basis = _pca_basis(xs, max(PCA_ABOVE, 8 * max(ks))) if sampled else None
    xs_fit = xs if basis is None else (xs - basis[0]) @ basis[1]
    steps = len(ks) + sampled
    scores, models, centres_by_k = [], {}, {}
    for i, k in enumerate(ks):
        model = _kmeans(k, n, seed).fit(xs_fit)
        if sampled:  # every row to the sample fit's nearest centroid (in the full space)
            centres = model.cluster_centers_ if basis is None else basis[0] + model.cluster_centers_ @ basis[1].T
            centres = centres.astype(np.float32)
            labels, inertia = _nearest(xn, row_sq, centres)
            centres_by_k[k] = centres
        else:
            labels, inertia = model.labels_, float(model.inertia_)
            models[k] = model
        sil = silhouette_score(sil_distances, labels[sil_rows], metric="precomputed")
        scores.append({"k": k, "calinski_harabasz": calinski_harabasz(xn64, labels, sum_sq),
                       "silhouette": float(sil), "inertia": inertia})
        if progress:
            progress(i + 1, steps)
    table = pd.DataFrame(scores)
    elbow_k = elbow(table["k"].tolist(), table["inertia"].tolist())
    chosen = elbow_k if selection == "elbow" else int(table.loc[table[selection].idxmax(), "k"])
    fit: dict[str, Any] = {"rows": int(n), "sample_rows": int(len(xs)), "sampled": bool(sampled)}
    if sampled:  # the one full-vocabulary fit
        model = KMeans(n_clusters=chosen, init=centres_by_k[chosen], n_init=1, max_iter=REFINE_MAX_ITER,
                       tol=REFINE_TOL).fit(xn)
        fit.update(pca_components=None if basis is None else int(basis[1].shape[1]),
                   refine_iterations=int(model.n_iter_), refine_inertia=float(model.inertia_),
                   stopping_rule=STOPPING_RULE)
        if progress:
            progress(steps, steps)
    else:
        model = models[chosen]
    labels = model.labels_
    centres = model.cluster_centers_ / np.linalg.norm(model.cluster_centers_, axis=1, keepdims=True).clip(1e-300)
    clusters = []
    for c in range(chosen):
        members = np.nonzero(labels == c)[0]
        if members.size == 0:
            continue
        closeness = xn[members] @ centres[c]
        best = members[np.argsort(-closeness, kind="stable")[:representatives]]
        clusters.append({"cluster": c, "size": int(members.size), "representatives": [int(valid[i]) for i in best]})
    clusters.sort(key=lambda item: -item["size"])
    out = {"rows": int(x.shape[0]), "zero_rows": int(x.shape[0] - n), "k_candidates": ks, "scores": scores,
           "chosen_k": chosen, "elbow_k": elbow_k, "selection": selection, "fit": fit, "clusters": clusters}
    if with_labels:
        out["labels"] = labels
    return out


@dataclass
class ClustersResult:
    matrices: dict[str, dict[str, Any]]
    source: Source
    anatomy: Anatomy

    def save(self, path) -> Path:
        from ..views import write_json

        return write_json({"source": self.source.label, "matrices": self.matrices}, path)


def clusters(source: Any, config: Config | None = None, *, k_range: tuple[int, int] = (2, 64),
             k_values: Sequence[int] | None = None, roles: Sequence[str] = ("embed.token",),
             representatives: int = 8, selection: str = "silhouette", exclude_untrained: bool = False,
             revision: str | None = None,
             progress: Callable[[str, int, int], None] | None = None, cached_only: bool = False,
             **overrides: Any) -> ClustersResult:
    """Token clusters of each requested embedding matrix (``embed.token`` by default);
    ``cached_only``: only what the store already holds."""
    config = (config or Config()).replace(**overrides)
    src = open_source(source, revision)
    anatomy = build_anatomy(src.infos, src.config)
    if selection not in SELECTIONS:
        raise LayerscopeError(f"--select-by must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    ks = sorted(set(k_values)) if k_values else k_grid(k_range)
    vocab = Vocabulary.of(src, anatomy)
    key = {"ks": ks, "seed": config.seed, "representatives": representatives, "selection": selection,
           "version": CLUSTERS_VERSION}
    if exclude_untrained:
        key["exclude_untrained"] = True
    params = json.dumps(key)
    out: dict[str, dict[str, Any]] = {}
    with Store(config.resolved_store()) as store:
        for role in roles:
            entries = [e for e in anatomy.by_role(role) if len(e.shape) == 2]
            if not entries:
                raise LayerscopeError(f"{src.label}: no {role} matrix to cluster")
            entry = entries[0]
            x, digest = src.read(entry.name)
            if not x.dtype.is_floating_point or not bool(torch.isfinite(x).all()):
                raise LayerscopeError(f"{src.label}: {entry.name} is not a finite floating-point matrix")
            result = store.artifact(digest, "clusters", params) if config.cache else None
            if result is None and cached_only:
                continue
            untrained = untrained_rows(x, vocab) if role != "embed.position" else Untrained()
            if result is None:
                cb = (lambda done, total, _r=role: progress(_r, done, total)) if progress else None
                keep = np.setdiff1d(np.arange(x.shape[0]), untrained.ids) if exclude_untrained else None
                result = cluster_rows(x if keep is None else x[torch.from_numpy(keep)], ks, config.seed,
                                      representatives=representatives, selection=selection, progress=cb)
                if keep is not None:  # ids of the kept rows back to vocabulary ids
                    for cluster in result["clusters"]:
                        cluster["representatives"] = [int(keep[i]) for i in cluster["representatives"]]
                store.put_artifact(digest, "clusters", params, result)
            decode = vocab.text if role != "embed.position" else (lambda i: f"position {i}")
            for cluster in result["clusters"]:
                cluster["text"] = [decode(i) for i in cluster["representatives"]]
                cluster["untrained"] = [i in untrained for i in cluster["representatives"]]
            result = {**result, "untrained": {**untrained.summary(), "excluded": exclude_untrained}}
            out[role] = {"name": entry.name, **result, "verdict": verdict(result)}
            if vocab.note and role != "embed.position":
                out[role]["notes"] = [vocab.note]
    return ClustersResult(out, src, anatomy)
