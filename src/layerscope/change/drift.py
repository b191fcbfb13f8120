"""Drift between two sets of weights: how much a matrix moved, and how much of that is a rotation.

Everything here works one tensor at a time in float64 and never forms anything larger than the
matrices themselves plus a min(m, n)² cross product.

The orthogonal Procrustes problem min_R ‖A R − B‖_F over orthogonal R is solved by R = U Vᵀ from
the SVD of AᵀB, and its optimum needs only the singular values: max_R ⟨A R, B⟩ = ‖AᵀB‖_* (the
nuclear norm). So ``procrustes_cosine`` = ‖AᵀB‖_* / (‖A‖‖B‖) and ``procrustes_residual`` =
‖A R − B‖ / ‖B‖ cost one GEMM and the singular values of the smaller side's cross matrix. A
matrix that was only rotated (a basis change the rest of the network absorbs) has
``procrustes_cosine`` 1 while its plain ``cosine`` can be anything.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

#: Rows of the long side multiplied at once when forming the cross product (bounds the float64 copies).
_ROW_BLOCK = 8192


def _as64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


def _cross(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """AᵀB for tall matrices, B Aᵀ for wide ones: the smaller side's cross product, in float64 blocks."""
    tall = a.shape[0] >= a.shape[1]
    n = a.shape[1] if tall else a.shape[0]
    out = np.zeros((n, n))
    long = a.shape[0] if tall else a.shape[1]
    for i in range(0, long, _ROW_BLOCK):
        if tall:
            ab, bb = _as64(a[i:i + _ROW_BLOCK]).numpy(), _as64(b[i:i + _ROW_BLOCK]).numpy()
            out += ab.T @ bb
        else:
            ab, bb = _as64(a[:, i:i + _ROW_BLOCK]).numpy(), _as64(b[:, i:i + _ROW_BLOCK]).numpy()
            out += bb @ ab.T
    return out


def pair_norms(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float, float]:
    """‖A‖², ‖B‖², ⟨A, B⟩ and ‖B − A‖² in float64, in row chunks (the difference is taken
    directly, not as ‖A‖² + ‖B‖² − 2⟨A, B⟩, which cancels catastrophically for small drifts)."""
    aa = bb = ab = dd = 0.0
    rows = a.shape[0] if a.dim() else 1
    a2, b2 = a.reshape(rows, -1), b.reshape(rows, -1)
    for i in range(0, a2.shape[0], _ROW_BLOCK):
        x, y = _as64(a2[i:i + _ROW_BLOCK]), _as64(b2[i:i + _ROW_BLOCK])
        aa += float((x * x).sum())
        bb += float((y * y).sum())
        ab += float((x * y).sum())
        dd += float(((y - x) ** 2).sum())
    return aa, bb, ab, dd


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def matrix_drift(a: torch.Tensor, b: torch.Tensor, procrustes: bool = True) -> dict[str, float]:
    """``rel_change`` ‖B−A‖/‖A‖, flattened ``cosine``, and (2-D only) the Procrustes-aligned
    ``procrustes_cosine`` and relative ``procrustes_residual`` ‖A R − B‖/‖B‖."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    aa, bb, ab, dd = pair_norms(a, b)
    out = {
        "rel_change": _ratio(math.sqrt(dd), math.sqrt(aa)),
        "cosine": _ratio(ab, math.sqrt(aa * bb)),
        "procrustes_cosine": math.nan,
        "procrustes_residual": math.nan,
    }
    if procrustes and a.dim() == 2 and min(a.shape) > 1 and aa > 0 and bb > 0:
        nuclear = float(np.linalg.svd(_cross(a, b), compute_uv=False).sum())
        # R = I is a candidate rotation, so the aligned fit is never worse than the raw one; the
        # bounds also remove the cancellation error of ‖A‖² + ‖B‖² − 2‖AᵀB‖_* for tiny drifts
        out["procrustes_cosine"] = min(1.0, max(nuclear / math.sqrt(aa * bb), out["cosine"]))
        out["procrustes_residual"] = min(math.sqrt(max(aa + bb - 2.0 * nuclear, 0.0) / bb), math.sqrt(dd / bb))
    return out


def procrustes_rotation(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """The orthogonal R (d × d) minimising ‖A R − B‖_F for tall A, B (n × d)."""
    u, _, vt = np.linalg.svd(_cross(a, b))
    return u @ vt


def token_drift(a: torch.Tensor, b: torch.Tensor, top_k: int = 50) -> dict[str, Any]:
    """Per-token drift of an embedding after aligning A to B by one rotation.

    The rotation is fitted on unit-normalised rows (so a few large-norm tokens do not decide it),
    then applied to the raw rows: the cosine of a token is scale-free, its distance is in the
    embedding's own units. Returned: summary statistics, and the ``top_k`` most and least
    drifted token ids with their cosine and distance (decoded by the caller).
    """
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"token drift needs two embeddings of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    na, nb = _row_norms(a), _row_norms(b)
    ua, ub = _unit_rows(a, na), _unit_rows(b, nb)
    rotation = procrustes_rotation(ua, ub)
    cos = np.empty(a.shape[0])
    dist = np.empty(a.shape[0])
    for i in range(0, a.shape[0], _ROW_BLOCK):
        x = _as64(a[i:i + _ROW_BLOCK]).numpy() @ rotation
        y = _as64(b[i:i + _ROW_BLOCK]).numpy()
        dots = np.einsum("ij,ij->i", x, y)
        den = na[i:i + _ROW_BLOCK] * nb[i:i + _ROW_BLOCK]
        with np.errstate(invalid="ignore", divide="ignore"):
            cos[i:i + len(x)] = np.where(den > 0, dots / den, np.nan)
        dist[i:i + len(x)] = np.linalg.norm(x - y, axis=1)
    order = np.argsort(np.where(np.isnan(cos), np.inf, cos), kind="stable")
    valid = order[~np.isnan(cos[order])]
    k = min(top_k, len(valid))

    def tokens(ids: np.ndarray) -> list[dict[str, Any]]:
        return [{"id": int(i), "cosine": float(cos[i]), "distance": float(dist[i])} for i in ids]

    finite = cos[~np.isnan(cos)]
    return {
        "tokens": int(a.shape[0]),
        "mean_cosine": float(finite.mean()) if finite.size else math.nan,
        "median_cosine": float(np.median(finite)) if finite.size else math.nan,
        "p10_cosine": float(np.percentile(finite, 10)) if finite.size else math.nan,
        "mean_distance": float(dist.mean()),
        "most_drifted": tokens(valid[:k]),
        "least_drifted": tokens(valid[::-1][:k]),
        "per_token_cosine": cos,
    }


def _row_norms(x: torch.Tensor) -> np.ndarray:
    return np.concatenate([np.linalg.norm(_as64(x[i:i + _ROW_BLOCK]).numpy(), axis=1)
                           for i in range(0, x.shape[0], _ROW_BLOCK)])


def _unit_rows(x: torch.Tensor, norms: np.ndarray) -> torch.Tensor:
    scale = torch.from_numpy(np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0))
    return (x.detach().to("cpu", torch.float32) * scale.to(torch.float32)[:, None])


def magnitude_threshold(task_vector: torch.Tensor, keep: float) -> float:
    """The |value| at or above which an entry is among the ``keep`` largest-magnitude fraction."""
    flat = task_vector.detach().reshape(-1).abs().float()
    n_keep = max(1, int(round(keep * flat.numel())))
    return 0.0 if n_keep >= flat.numel() else float(flat.kthvalue(flat.numel() - n_keep + 1).values)


def _conflicting(chunks: list[torch.Tensor], thresholds: list[float] | None = None) -> int:
    """Entries where some task vector is > 0 and another < 0 (below its threshold an entry has no sign)."""
    pos = neg = None
    for i, tv in enumerate(chunks):
        live = tv.abs() >= thresholds[i] if thresholds is not None else torch.ones_like(tv, dtype=torch.bool)
        p, n = (tv > 0) & live, (tv < 0) & live
        pos = p if pos is None else pos | p
        neg = n if neg is None else neg | n
    return int((pos & neg).sum()) if pos is not None else 0


def sign_conflicts(task_vectors: list[torch.Tensor], keep: float | None = None) -> float:
    """Share of entries where the task vectors disagree in sign (some > 0 and some < 0).

    ``keep``: first trim each task vector to its largest-magnitude ``keep`` fraction of entries
    (TIES merging's trim step; 0.2 there); trimmed entries and zeros have no sign.
    """
    if not task_vectors or task_vectors[0].numel() == 0:
        return math.nan
    thresholds = [magnitude_threshold(tv, keep) for tv in task_vectors] if keep is not None else None
    return _conflicting([tv.reshape(-1) for tv in task_vectors], thresholds) / task_vectors[0].numel()


def task_vector_stats(base: torch.Tensor, models: dict[str, torch.Tensor], keep: float = 0.2) -> dict[str, float]:
    """Norms and pairwise cosines of the task vectors ``model − base`` and their sign-conflict
    rates (raw, and after TIES-style trimming to the top ``keep`` fraction by magnitude).

    Sums run over row chunks in float64; only the trim thresholds need one whole task vector
    (in float32) at a time.
    """
    labels = list(models)
    numel = base.numel()
    thresholds = [magnitude_threshold(models[lb].float() - base.float(), keep) for lb in labels]
    rows = base.shape[0] if base.dim() else 1
    b2 = base.reshape(rows, -1)
    m2 = [models[lb].reshape(rows, -1) for lb in labels]
    sq = np.zeros(len(labels))
    dots = np.zeros((len(labels), len(labels)))
    raw = trimmed = 0
    for i in range(0, rows, _ROW_BLOCK):
        b = _as64(b2[i:i + _ROW_BLOCK])
        chunks = [_as64(m[i:i + _ROW_BLOCK]) - b for m in m2]
        for x, cx in enumerate(chunks):
            sq[x] += float((cx * cx).sum())
            for y in range(x + 1, len(chunks)):
                dots[x, y] += float((cx * chunks[y]).sum())
        raw += _conflicting(chunks)
        trimmed += _conflicting(chunks, thresholds)
    out: dict[str, float] = {f"norm[{lb}]": math.sqrt(sq[x]) for x, lb in enumerate(labels)}
    for x, lx in enumerate(labels):
        for y in range(x + 1, len(labels)):
            out[f"cosine[{lx}~{labels[y]}]"] = _ratio(dots[x, y], math.sqrt(sq[x] * sq[y]))
    out["sign_conflict"] = raw / numel if numel else math.nan
    out[f"sign_conflict_top{round(keep * 100)}"] = trimmed / numel if numel else math.nan
    return out
