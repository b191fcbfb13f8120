"""Fused reduction of one block of cosine similarities: histogram, moments and threshold counts.

The block is ``C[r, c] = cos(x_{row0 + r}, x_{col0 + c})``; only pairs with column > row (the
upper triangle of the full matrix) are counted, so every unordered pair is seen exactly once.
One pass over the block does everything, which is what keeps the whole all-pairs computation
within a few percent of the bare GEMM. Bin index ``floor((v - lo) * scale)`` is computed in
float64 from the stored value, so a float64 reference using the same formula agrees exactly.

With numba (``pip install numba``; in the test extras) the pass is a parallel compiled loop;
without it the same reduction runs as torch operations (several passes, slower, same result).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

try:  # optional accelerator
    import numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None
    HAVE_NUMBA = False


@dataclass
class BlockTotals:
    """Running totals over all blocks."""

    bins: int
    vocab: int
    counts: np.ndarray = field(init=False)
    below: int = 0
    above: int = 0
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    neighbours: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.counts = np.zeros(self.bins, dtype=np.int64)
        self.neighbours = np.zeros(self.vocab, dtype=np.int64)

    def merge_moments(self, n: int, total: float, total_sq: float) -> None:
        """Chan et al. merge of a block's (count, Σ, Σ²) into the running mean and M2."""
        if n == 0:
            return
        b_mean = total / n
        b_m2 = max(total_sq - n * b_mean * b_mean, 0.0)
        delta = b_mean - self.mean
        combined = self.n + n
        self.mean += delta * n / combined
        self.m2 += b_m2 + delta * delta * self.n * n / combined
        self.n = combined


if HAVE_NUMBA:

    @numba.njit(inline="always")
    def _bin(v, lo, hi, scale, bins):  # pragma: no cover - compiled
        if v < lo:
            return bins
        if v > hi:
            return bins + 1
        k = int((v - lo) * scale)  # v >= lo, so truncation is floor
        return k if k < bins else bins - 1

    @numba.njit(parallel=True, cache=True)
    def _block_numba(c, row0, col0, lo, hi, scale, bins, thr, n_threads):  # pragma: no cover - compiled
        rows, cols = c.shape
        # 4 interleaved sub-histograms per thread break the store->load chain on a popular bin
        hist = np.zeros((n_threads, 4, bins + 2), dtype=np.int64)
        col_hits = np.zeros((n_threads, cols), dtype=np.int64)
        row_hits = np.zeros(rows, dtype=np.int64)
        sums = np.zeros(rows, dtype=np.float64)
        sqs = np.zeros(rows, dtype=np.float64)
        counts = np.zeros(rows, dtype=np.int64)
        for r in numba.prange(rows):
            t = numba.get_thread_id()
            start = row0 + r + 1 - col0
            if start < 0:
                start = 0
            s0 = s1 = s2 = s3 = 0.0
            q0 = q1 = q2 = q3 = 0.0
            hits = 0
            j = start
            while j + 4 <= cols:
                v0 = np.float64(c[r, j])
                v1 = np.float64(c[r, j + 1])
                v2 = np.float64(c[r, j + 2])
                v3 = np.float64(c[r, j + 3])
                s0 += v0
                s1 += v1
                s2 += v2
                s3 += v3
                q0 += v0 * v0
                q1 += v1 * v1
                q2 += v2 * v2
                q3 += v3 * v3
                hist[t, 0, _bin(v0, lo, hi, scale, bins)] += 1
                hist[t, 1, _bin(v1, lo, hi, scale, bins)] += 1
                hist[t, 2, _bin(v2, lo, hi, scale, bins)] += 1
                hist[t, 3, _bin(v3, lo, hi, scale, bins)] += 1
                if v0 > thr or v1 > thr or v2 > thr or v3 > thr:
                    for u in range(4):
                        if np.float64(c[r, j + u]) > thr:
                            hits += 1
                            col_hits[t, j + u] += 1
                j += 4
            while j < cols:
                v = np.float64(c[r, j])
                s0 += v
                q0 += v * v
                hist[t, 0, _bin(v, lo, hi, scale, bins)] += 1
                if v > thr:
                    hits += 1
                    col_hits[t, j] += 1
                j += 1
            row_hits[r] = hits
            sums[r] = (s0 + s1) + (s2 + s3)
            sqs[r] = (q0 + q1) + (q2 + q3)
            counts[r] = cols - start if cols > start else 0
        return hist.sum(axis=0).sum(axis=0), row_hits, col_hits.sum(axis=0), counts.sum(), sums.sum(), sqs.sum()


def _block_torch(c: torch.Tensor, row0: int, col0: int, lo: float, hi: float, scale: float, bins: int, thr: float):
    """The same reduction with torch ops (GPU blocks, or CPUs without numba)."""
    rows, cols = c.shape
    r_idx = torch.arange(rows, device=c.device)[:, None] + row0
    c_idx = torch.arange(cols, device=c.device)[None, :] + col0
    keep = c_idx > r_idx if row0 + rows > col0 else None
    values = c[keep] if keep is not None else c.reshape(-1)
    v64 = values.to(torch.float64)
    below = int((v64 < lo).sum())
    above = int((v64 > hi).sum())
    inside = v64[(v64 >= lo) & (v64 <= hi)]
    k = torch.floor((inside - lo) * scale).long().clamp_(max=bins - 1)
    hist = np.zeros(bins + 2, dtype=np.int64)
    hist[:bins] = torch.bincount(k, minlength=bins).cpu().numpy()
    hist[bins], hist[bins + 1] = below, above
    mask = c.to(torch.float64) > thr
    if keep is not None:
        mask &= keep
    hit_rows, hit_cols = torch.nonzero(mask, as_tuple=True)
    row_hits = torch.bincount(hit_rows, minlength=rows).cpu().numpy()
    col_hits = torch.bincount(hit_cols, minlength=cols).cpu().numpy()
    return hist, row_hits, col_hits, int(v64.numel()), float(v64.sum()), float((v64 * v64).sum())


def reduce_block(totals: BlockTotals, c: torch.Tensor, row0: int, col0: int, lo: float, hi: float, thr: float,
                 use_numba: bool = True) -> None:
    """Fold block ``c`` (rows row0.., columns col0..) into ``totals``."""
    scale = totals.bins / (hi - lo)
    if use_numba and HAVE_NUMBA and c.device.type == "cpu":
        hist, row_hits, col_hits, n, s, sq = _block_numba(c.numpy(), row0, col0, lo, hi, scale, totals.bins, thr,
                                                          numba.get_num_threads())
    else:
        hist, row_hits, col_hits, n, s, sq = _block_torch(c, row0, col0, lo, hi, scale, totals.bins, thr)
    totals.counts += hist[:totals.bins]
    totals.below += int(hist[totals.bins])
    totals.above += int(hist[totals.bins + 1])
    totals.neighbours[row0:row0 + c.shape[0]] += row_hits
    totals.neighbours[col0:col0 + c.shape[1]] += col_hits
    totals.merge_moments(int(n), float(s), float(sq))
