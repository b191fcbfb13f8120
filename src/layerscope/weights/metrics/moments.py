"""Elementwise statistics of any tensor, from one chunked float64 pass.

Chunking keeps the float64 working copy small (memory stays bounded by the tensor itself), and
merging per-chunk moments (Chan et al.) keeps the variance accurate; a chunk whose |mean| dwarfs
its spread (LayerNorm gains, constant tensors) is redone in two passes so the variance stays
exact there too. NaN and Inf are counted, and the other statistics are taken over the finite
values so one bad entry does not hide what the rest of the tensor looks like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .registry import register

#: Elements per float64 chunk (512 KiB): small enough to stay in a core's L2 cache across the
#: five passes over it (sum, dot, aminmax, 1-norm, zero count). 16 MiB chunks streamed each pass
#: from memory: 0.49 s against 0.21 s on a 32000 × 2048 float32 matrix (issue 16, one thread).
CHUNK = 1 << 16


@dataclass
class Moments:
    numel: int
    finite: int
    mean: float
    m2: float  # sum of squared deviations from the mean (finite values)
    min: float
    max: float
    abs_sum: float
    sq_sum: float
    zeros: int
    nans: int
    infs: int


def moments(tensor: torch.Tensor) -> Moments:
    flat = tensor.detach().reshape(-1)
    n_total = flat.numel()
    count, mean, m2 = 0, 0.0, 0.0
    lo, hi, abs_sum, sq_sum, zeros, nans, infs = math.inf, -math.inf, 0.0, 0.0, 0, 0, 0
    buf = torch.empty(min(CHUNK, n_total), dtype=torch.float64)  # reused: no page faults per chunk
    for start in range(0, n_total, CHUNK):
        chunk = flat[start:start + CHUNK]
        x = buf[:chunk.numel()]
        x.copy_(chunk)
        zeros += chunk.numel() - int(torch.count_nonzero(chunk))
        c_sum = float(x.sum())
        c_sq = float(torch.dot(x, x))
        if not (math.isfinite(c_sum) and math.isfinite(c_sq)):  # only then look for NaN/Inf entries
            finite = torch.isfinite(x)
            n_nan = int(torch.isnan(x).sum())
            n_fin = int(finite.sum())
            nans += n_nan
            infs += x.numel() - n_fin - n_nan
            x = x[finite]
            c_sum, c_sq = float(x.sum()), float(torch.dot(x, x))
        n = x.numel()
        if n == 0:
            continue
        c_mean = c_sum / n
        c_m2 = c_sq - n * c_mean * c_mean
        if c_m2 < 1e-6 * c_sq:  # |mean| >> std (e.g. LayerNorm gains): redo exactly in two passes
            d = x - c_mean
            c_m2 = float(torch.dot(d, d))
            del d
        delta = c_mean - mean
        total = count + n
        mean += delta * n / total
        m2 += c_m2 + delta * delta * count * n / total
        count = total
        c_lo, c_hi = torch.aminmax(x)
        lo, hi = min(lo, float(c_lo)), max(hi, float(c_hi))
        abs_sum += float(torch.linalg.vector_norm(x, 1))
        sq_sum += c_sq
    if count == 0:
        lo = hi = mean = math.nan
    return Moments(n_total, count, mean, m2, lo, hi, abs_sum, sq_sum, zeros, nans, infs)


def _over_finite(m: Moments, value: float) -> float:
    return value if m.finite else math.nan


@register("mean", "moments", "stats")
def mean(m: Moments) -> float:
    """Mean of the finite entries."""
    return _over_finite(m, m.mean)


@register("std", "moments", "stats")
def std(m: Moments) -> float:
    """Population standard deviation of the finite entries."""
    return _over_finite(m, math.sqrt(m.m2 / m.finite) if m.finite else math.nan)


@register("min", "moments", "stats")
def minimum(m: Moments) -> float:
    """Smallest finite entry."""
    return m.min


@register("max", "moments", "stats")
def maximum(m: Moments) -> float:
    """Largest finite entry."""
    return m.max


@register("abs_mean", "moments", "stats")
def abs_mean(m: Moments) -> float:
    """Mean absolute value of the finite entries."""
    return m.abs_sum / m.finite if m.finite else math.nan


@register("zero_fraction", "moments", "stats")
def zero_fraction(m: Moments) -> float:
    """Share of entries exactly zero."""
    return m.zeros / m.numel if m.numel else math.nan


@register("frobenius_norm", "moments", "stats")
def frobenius_norm(m: Moments) -> float:
    """sqrt of the sum of squares of the finite entries."""
    return math.sqrt(m.sq_sum) if m.numel else math.nan


@register("nan_count", "moments", "stats", integer=True)
def nan_count(m: Moments) -> int:
    """Number of NaN entries."""
    return m.nans


@register("inf_count", "moments", "stats", integer=True)
def inf_count(m: Moments) -> int:
    """Number of ±Inf entries."""
    return m.infs
