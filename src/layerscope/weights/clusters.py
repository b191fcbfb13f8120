"""Token clusters: k-means on normalised embedding rows over a range of k, decoded to text.

k is chosen by the silhouette (cosine, on a seeded sample of rows) unless ``selection`` asks for the
Calinski–Harabasz index (on all rows) or the inertia elbow; all three are reported beside the choice
so a reader can judge it. The silhouette is the default because Calinski–Harabasz favours small k on
embedding matrices (MiniLM: k = 2, the ``[unused…]`` tokens against the rest). Large
vocabularies use MiniBatchKMeans. Everything is seeded, so a run is reproducible. The silhouette
sample's cosine distances are computed once for every k (at d_model 2048 they cost more than a
MiniBatchKMeans fit); choosing k from fits on a 12000-row sample was tried and dropped (on MiniLM
it chose k = 13 instead of 25 and was no faster). Each matrix is
clustered on its own: position embeddings are never mixed into token clusters.
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
CLUSTERS_VERSION = "1"  # unchanged results: the silhouette distances are only computed once


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


def cluster_rows(x: torch.Tensor, ks: Sequence[int], seed: int = 0, silhouette_sample: int = 5000,
                 representatives: int = 8, selection: str = "silhouette",
                 progress: Callable[[int, int], None] | None = None, with_labels: bool = False) -> dict[str, Any]:
    """k-means over ``ks`` on the normalised rows of ``x``; the chosen clustering with its members.

    ``with_labels``: also return every non-zero row's cluster (``labels``; for comparisons, not stored)."""
    from sklearn.metrics import calinski_harabasz_score, silhouette_score
    from sklearn.metrics.pairwise import cosine_distances

    x64 = x.to(torch.float64)
    norms = torch.linalg.vector_norm(x64, dim=1)
    valid = torch.nonzero(norms > 0).squeeze(1).numpy()
    xn = (x64[valid] / norms[valid, None]).to(torch.float32).numpy()
    n = len(xn)
    ks = [k for k in ks if k < n]
    if not ks:
        raise LayerscopeError(f"clusters: {n} rows are too few for the requested k")
    # The silhouette's rows are the same for every k (sklearn draws them from ``seed``): their
    # cosine distances are computed once, not once per k. Same rows, same values as before.
    sil_rows = np.random.RandomState(seed).permutation(n)[:min(silhouette_sample, n)]
    sil_distances = cosine_distances(xn[sil_rows])
    scores, models = [], {}
    for i, k in enumerate(ks):
        model = _kmeans(k, n, seed).fit(xn)
        labels = model.labels_
        sil = silhouette_score(sil_distances, labels[sil_rows], metric="precomputed")
        scores.append({"k": k, "calinski_harabasz": float(calinski_harabasz_score(xn, labels)),
                       "silhouette": float(sil), "inertia": float(model.inertia_)})
        models[k] = model
        if progress:
            progress(i + 1, len(ks))
    table = pd.DataFrame(scores)
    elbow_k = elbow(table["k"].tolist(), table["inertia"].tolist())
    chosen = elbow_k if selection == "elbow" else int(table.loc[table[selection].idxmax(), "k"])
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
           "chosen_k": chosen, "elbow_k": elbow_k, "selection": selection, "clusters": clusters}
    if with_labels:
        out["labels"] = labels
    return out


@dataclass
class ClustersResult:
    matrices: dict[str, dict[str, Any]]
    source: Source
    anatomy: Anatomy

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"source": self.source.label, "matrices": self.matrices}, indent=1))
        return path


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
