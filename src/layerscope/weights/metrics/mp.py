"""The random-matrix null of a weight matrix: the Marchenko–Pastur (MP) law of its shape and scale.

Why: a spectral metric ("low effective rank", "large spectral norm") means something only if the
matrix differs from a random matrix of the same shape and scale, whose spectrum is known in closed
form. For W of shape N × M (N ≥ M) with iid entries of variance σ², the eigenvalues λ = s² of WᵀW,
divided by Nσ², follow the MP law of ratio y = M/N on [(1 − √y)², (1 + √y)²], density
√((b − x)(x − a)) / (2π y x). Three numbers per matrix, from the singular values computed once:

- ``mp_sigma``: the scale σ, matched on the MEDIAN eigenvalue, σ² = median(λ) / (N · median of MP_y).
  A few outlying singular values (or a heavy tail) barely move the median, whereas the Frobenius
  estimate ‖W‖²_F / (NM) is inflated by them and would hide the very spikes we look for. When half
  of the eigenvalues or more are zero (rank < M/2, never the case for a random matrix) the median
  says nothing and the Frobenius estimate is used.
- ``mp_edge``: the largest singular value of the fitted random matrix, σ(√N + √M); ``mp_spikes``: the
  singular values above it by more than the finite-size fluctuation of the largest eigenvalue of a
  Gaussian matrix: λ > σ² (μ + 4τ) with Johnstone's (2001) centring μ = (√(N−1) + √M)² and scale
  τ = (√(N−1) + √M)(1/√(N−1) + 1/√M)^{1/3}. (λ_max − σ²μ)/(σ²τ) is Tracy–Widom TW₁, whose 99.9 %
  quantile is 3.27, so a Gaussian matrix shows a spurious spike less than once in a thousand.
- ``mp_ks``: the Kolmogorov–Smirnov distance sup|F_emp − F_MP| between the eigenvalue distribution
  and the fitted MP law. The spectrum is "indistinguishable from random" when there is no spike and
  the distance is below ``ks_critical(M) = 1.36 / √M`` (the 95 % critical value for M independent
  draws; conservative here, since random-matrix eigenvalues are far more regular than independent
  draws: Gaussian matrices give distances of a few 1/M).
- ``mp_softrank``: WeightWatcher's λ_edge / λ_max (1 for a random matrix, → 0 as a spike dominates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .registry import register

TW_MARGIN = 4.0  # Tracy–Widom scales above the centring (TW₁ 99.9 % quantile: 3.27)
KS_COEFF = 1.36  # two-sided 95 % Kolmogorov critical value × √n
MIN_EIGENVALUES = 8  # below this the law is asymptotics without data: no fit
GRID = 4097


@dataclass(frozen=True)
class MPFit:
    sigma2: float  # fitted entry variance σ²
    edge: float  # bulk edge of the eigenvalues λ = s²: σ²(√N + √M)²
    threshold: float  # edge plus the Tracy–Widom margin: σ²(μ + 4τ)
    spikes: int
    ks: float
    scale_from: str  # "median" or "frobenius"


NO_FIT = MPFit(math.nan, math.nan, math.nan, 0, math.nan, "")


@lru_cache(maxsize=64)
def _mp_table(y: float) -> tuple[np.ndarray, np.ndarray, float, float]:
    """The standard MP_y CDF on a grid of φ, where x = c − r cos φ runs from a (φ = 0) to b (φ = π).

    The substitution removes the square-root edges: dF = r² sin²φ / (2π y (c − r cos φ)) dφ is smooth
    (at y = 1 it is (1 + cos φ) / π), so the cumulative trapezoid is accurate to ~1e-7.
    """
    a, b = (1 - math.sqrt(y)) ** 2, (1 + math.sqrt(y)) ** 2
    c, r = (a + b) / 2, (b - a) / 2
    phi = np.linspace(0.0, math.pi, GRID)
    denom = c - r * np.cos(phi)
    with np.errstate(invalid="ignore", divide="ignore"):
        g = np.where(denom > 0, r * r * np.sin(phi) ** 2 / (2 * math.pi * y * denom), (1 + np.cos(phi)) / math.pi)
    cdf = np.concatenate([[0.0], np.cumsum((g[1:] + g[:-1]) / 2 * np.diff(phi))])
    cdf /= cdf[-1]  # total mass exactly 1
    return phi, cdf, c, r


def mp_cdf(x: np.ndarray, y: float) -> np.ndarray:
    """CDF of the standard MP law of ratio y ∈ (0, 1] (unit variance, eigenvalues of WᵀW / N)."""
    phi, cdf, c, r = _mp_table(float(y))
    x = np.asarray(x, dtype=np.float64)
    arg = np.clip((c - x) / r, -1.0, 1.0)
    return np.interp(np.arccos(arg), phi, cdf)


def mp_median(y: float) -> float:
    phi, cdf, c, r = _mp_table(float(y))
    return float(c - r * math.cos(float(np.interp(0.5, cdf, phi))))


def tracy_widom_threshold(n: int, m: int, margin: float = TW_MARGIN) -> float:
    """μ + margin·τ (Johnstone 2001) for an n × m (n ≥ m) matrix of unit-variance entries."""
    root = math.sqrt(n - 1) + math.sqrt(m)
    return root * root + margin * root * (1 / math.sqrt(n - 1) + 1 / math.sqrt(m)) ** (1 / 3)


def ks_critical(m: int) -> float:
    """KS distance below which an ESD of m eigenvalues counts as MP (see the module docstring)."""
    return KS_COEFF / math.sqrt(m)


def fit_mp(evals: np.ndarray, shape: tuple[int, int]) -> MPFit:
    """Fit the MP null to the eigenvalues λ = s² (any order) of a matrix of ``shape``."""
    lam = np.sort(np.asarray(evals, dtype=np.float64))
    n, m = max(shape), min(shape)
    if len(lam) < MIN_EIGENVALUES or m < MIN_EIGENVALUES or not np.isfinite(lam).all() or lam[-1] <= 0:
        return NO_FIT
    lam = np.clip(lam, 0.0, None)
    y = m / n
    median = float(np.median(lam))
    if median > 1e-12 * lam[-1]:
        sigma2, scale_from = median / (n * mp_median(y)), "median"
    else:  # half of the eigenvalues or more are zero: the median says nothing
        sigma2, scale_from = float(lam.sum()) / (n * m), "frobenius"
    edge = sigma2 * (math.sqrt(n) + math.sqrt(m)) ** 2
    threshold = sigma2 * tracy_widom_threshold(n, m)
    spikes = int(np.count_nonzero(lam > threshold))
    f = mp_cdf(lam / (n * sigma2), y)
    i = np.arange(1, len(lam) + 1)
    ks = float(max(np.max(i / len(lam) - f), np.max(f - (i - 1) / len(lam))))
    return MPFit(sigma2, edge, threshold, spikes, ks, scale_from)


def is_random_like(spikes: float, ks: float, m: int) -> bool:
    """The stated rule: no spike above the edge + Tracy–Widom margin and KS distance ≤ 1.36/√M."""
    return spikes == 0 and ks <= ks_critical(m)


# -- registered metrics (each a function of the shared Spectrum; the fit is memoised on it) --------
@register("mp_sigma", "spectrum", "spectral")
def mp_sigma(s) -> float:
    """Entry scale σ of the Marchenko–Pastur null, matched on the median eigenvalue."""
    return math.sqrt(s.mp().sigma2)


@register("mp_edge", "spectrum", "spectral")
def mp_edge(s) -> float:
    """Largest singular value of a random matrix of this shape and scale, σ(√N + √M)."""
    return math.sqrt(s.mp().edge)


@register("mp_spikes", "spectrum", "spectral", integer=True)
def mp_spikes(s) -> int:
    """Singular values above the MP edge plus 4 Tracy–Widom scales."""
    return s.mp().spikes


@register("mp_ks", "spectrum", "spectral")
def mp_ks(s) -> float:
    """Kolmogorov–Smirnov distance of the eigenvalue distribution from the fitted MP law."""
    return s.mp().ks


@register("mp_softrank", "spectrum", "spectral")
def mp_softrank(s) -> float:
    """MP edge² / σ_max², as WeightWatcher's mp_softrank (1: random; → 0: one direction dominates)."""
    fit = s.mp()
    return fit.edge / float(s.sv[0]) ** 2 if math.isfinite(fit.edge) else math.nan
