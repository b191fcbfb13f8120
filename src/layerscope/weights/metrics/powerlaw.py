"""The power-law fit of an empirical spectral density, the way WeightWatcher 0.7 does it.

Continuous power law, Clauset–Shalizi–Newman MLE ``alpha = 1 + n / Σ log(x_i / x_min)`` for every
candidate x_min, and x_min chosen by the smallest Kolmogorov–Smirnov distance. Eigenvalues at or
below ``thresh`` are dropped first, matrices with fewer than ``min_evals`` eigenvalues get no fit
(WeightWatcher skips those layers), and fewer than 20 eigenvalues use WeightWatcher's small-n
variant. The O(n²) scan is vectorised in row blocks instead of WeightWatcher's Python loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SMALL_N = 20
BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class PowerLawFit:
    alpha: float
    xmin: float
    D: float
    n_tail: int


NO_FIT = PowerLawFit(math.nan, math.nan, math.nan, 0)


def fit_powerlaw(evals: np.ndarray, thresh: float = 1e-5, min_evals: int = 8) -> PowerLawFit:
    """Fit the ESD ``evals``; NaN when the matrix has fewer than ``min_evals`` eigenvalues (WW skips those)."""
    if len(evals) < min_evals:
        return NO_FIT
    data = np.sort(np.asarray(evals, dtype=np.float64))
    data = data[data > thresh]
    n_total = len(data)
    if n_total < 2:
        return NO_FIT
    if n_total < SMALL_N:
        return _fit_small_n(data)
    alphas, ds = ks_scan(data)
    best = int(np.argmin(ds))
    return PowerLawFit(float(alphas[best]), float(data[best]), float(ds[best]), int(n_total - best))


def ks_scan(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For sorted ``data`` (n >= SMALL_N): the MLE alpha and the KS distance of every candidate x_min."""
    n_total = len(data)
    log_data = np.log(data)
    tail_log_sums = np.cumsum(log_data[::-1])[::-1]  # Σ_{j≥i} log x_j
    idx = np.arange(n_total - 1)
    n = (n_total - idx).astype(np.float64)
    denom = tail_log_sums[:-1] - n * log_data[:-1]
    # A tail of equal values has Σ log(x/x_min) = 0; in floating point (eigenvalues that are equal up
    # to the eigensolver's rounding, and two sums that cancel) it comes out as noise, which made alpha
    # 1e15 for c·W where it was inf for W. Σ log(x/x_min) is scale-free, so a tail whose mean log
    # ratio is below 1e-12 (or below the sums' own rounding) is taken as degenerate: alpha = inf.
    rounding = 64 * np.finfo(np.float64).eps * (np.abs(tail_log_sums[:-1]) + n * np.abs(log_data[:-1]))
    denom = np.where(np.abs(denom) <= np.maximum(n * 1e-12, rounding), 0.0, denom)
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + n / denom
    ds = np.ones(n_total - 1)
    # blocks of candidate rows; smaller blocks skip more of the masked lower triangle
    rows = max(1, min(n_total // 8 + 1, BLOCK_ELEMENTS // n_total))
    for start in range(0, n_total - 1, rows):
        i = idx[start:start + rows]
        a = alphas[i]
        ok = np.isfinite(a) & (a > 1)  # a degenerate (inf) candidate is never chosen by the KS scan
        if not ok.any():
            continue
        i, a = i[ok], a[ok]
        # only the tail j >= start matters for this block of candidates: the work is triangular
        tail_log = log_data[start:]
        j = np.arange(start, n_total)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            # theoretical CDF 1 - (x_j/x_i)^(1-alpha) minus the empirical (j-i)/n, for j >= i
            fit_cdf = 1.0 - np.exp((1.0 - a[:, None]) * (tail_log[None, :] - log_data[i, None]))
            emp_cdf = (j[None, :] - i[:, None]) / (n_total - i)[:, None]
            diff = np.abs(fit_cdf - emp_cdf)
        diff[j[None, :] < i[:, None]] = 0.0
        ds[i] = diff.max(axis=1)
    return alphas, ds


def certified_alpha_error(evals: np.ndarray, thresh: float, rel_lam: np.ndarray) -> float:
    """Bound on the relative change of the fitted alpha when each eigenvalue ``evals[i]`` may move
    by the relative amount ``rel_lam[i]``; inf when the fit's discrete choices might change.

    The set above ``thresh`` must stay the same, and the KS-chosen x_min must win by more than
    each candidate's KS distance can move: with ℓ_k = log(x_k / x_min) moved by at most
    η = 2·max_k≥min log((1+r_k)/(1−r_k)) and a = alpha − 1 = n / Σℓ_k, |Δa| ≤ η·a² / (1 − η·a),
    and the model CDF 1 − exp(−aℓ) moves by at most |Δa|/(e·(a − |Δa|)) + (a + |Δa|)·η
    (mean-value bounds on ∂/∂a and ∂/∂ℓ); the empirical CDF keeps its order (sorted eigenvalues
    pair by index, Weyl).
    """
    order = np.argsort(evals, kind="stable")
    data = np.asarray(evals, dtype=np.float64)[order]
    rel = np.asarray(rel_lam, dtype=np.float64)[order]
    if np.any(~(rel < 0.1)) or np.any(np.abs(data - thresh) <= 1.01 * rel * np.abs(data)):
        return math.inf
    keep = data > thresh
    data, rel = data[keep], rel[keep]
    if len(data) < SMALL_N:
        return math.inf  # the small-n variant's bias-corrected choice is not bounded here
    alphas, ds = ks_scan(data)
    # every ℓ_k of candidate j involves x_k >= x_j: the largest relative error among them
    worst = np.maximum.accumulate(rel[::-1])[::-1][:-1]
    eta = 2.0 * np.log((1 + worst) / (1 - worst))
    a = alphas - 1.0
    if not np.all(np.isfinite(a)) or np.any(eta * a >= 0.5):
        return math.inf
    da = eta * a * a / (1.0 - eta * a)
    dd = da / (math.e * (a - da)) + (a + da) * eta
    best = int(np.argmin(ds))
    others = np.delete(ds - dd, best)
    if others.size and not (ds[best] + dd[best] < others.min()):
        return math.inf
    return float(da[best] / alphas[best])


def _fit_small_n(data: np.ndarray, k_min: int = 8) -> PowerLawFit:
    """WeightWatcher's small-n fit: bias-corrected MLE, x_min by D_ks - 0.868/sqrt(n_tail)."""
    n_total = len(data)
    log_data = np.log(data)
    best_j, best_obj = None, math.inf
    alphas = np.zeros(n_total - 1)
    ds = np.ones(n_total - 1)
    for i in range(n_total - 1):
        n_int = n_total - i
        if n_int < k_min:
            continue
        s = float(np.sum(log_data[i:]) - n_int * log_data[i])
        if s <= 1e-12:
            continue
        alpha = 1.0 + (n_int - 1.0) / s
        alphas[i] = alpha
        if alpha <= 1.0:
            continue
        fit_cdf = 1.0 - (data[i:] / data[i]) ** (1.0 - alpha)
        d = float(np.max(np.abs(np.arange(n_int) / n_int - fit_cdf)))
        ds[i] = d
        obj = d - 0.868 / math.sqrt(n_int)
        if obj < best_obj:
            best_j, best_obj = i, obj
    if best_j is None:
        s = float(np.sum(log_data) - n_total * log_data[0])
        if s <= 1e-12:
            return PowerLawFit(1.0, float(data[0]), 1.0, n_total)
        alpha = 1.0 + (n_total - 1.0) / s
        fit_cdf = 1.0 - (data / data[0]) ** (1.0 - alpha)
        d = float(np.max(np.abs(np.arange(n_total) / n_total - fit_cdf)))
        return PowerLawFit(alpha, float(data[0]), d, n_total)
    return PowerLawFit(float(alphas[best_j]), float(data[best_j]), float(ds[best_j]), n_total - best_j)
