"""Metrics of a matrix's singular values. Each is one function of a shared :class:`Spectrum`.

WeightWatcher conventions where we report its quantities: the ESD is the eigenvalues of WᵀW,
i.e. σ², unnormalised; ``log_norm = log10(Σσ²)``, ``log_spectral_norm = log10(σ_max²)``,
``alpha_weighted = alpha · log_spectral_norm``. ``spectral_norm`` itself is σ_max (the operator
2-norm), as in NumPy.
"""

from __future__ import annotations

import math

import numpy as np

from ..spectrum import Spectrum
from .powerlaw import certified_alpha_error
from .registry import register

#: A certified metric is within this relative bound of the float64 value (half the 1e-4 promise).
CERT_TOL = 5e-5


# -- certificates: is the value from a mixed-precision spectrum (σ_i within rel_err_i) good? -----
# First-order bounds with a 10 % allowance for the second-order terms (the rel_err are <= 1e-3).
def _sigma_range(s: Spectrum) -> tuple[np.ndarray, np.ndarray]:
    return s.sv / (1 + s.rel_err), s.sv / (1 - np.minimum(s.rel_err, 0.5))


def _energy_error(s: Spectrum) -> float:
    """Relative bound on Σσ²."""
    e2 = s.sv.astype(np.float64) ** 2
    return float(np.sum(2.2 * s.rel_err * e2) / np.sum(e2))


def _log_error(value: float, rel: float) -> float:
    """Relative error of log10(x) when x moves by the relative amount ``rel``."""
    return 1.1 * rel / math.log(10) / abs(value) if value else math.inf


def _rank_certified(s: Spectrum, tol: float | None = None) -> bool:
    lo, hi = _sigma_range(s)
    factor = max(s.shape) * np.finfo(np.float64).eps
    tol_lo, tol_hi = (tol, tol) if tol is not None else (lo[0] * factor, hi[0] * factor)
    return bool(np.all((lo > tol_hi) | (hi <= tol_lo)))


def _energy_rank_certified(s: Spectrum, p: float) -> bool:
    k = _energy_rank(s, p)
    e2 = s.sv.astype(np.float64) ** 2
    cumulative = np.cumsum(e2)
    slack = np.cumsum(2.2 * s.rel_err * e2)  # bound on each partial sum's absolute error
    total_lo, total_hi = cumulative[-1] - slack[-1], cumulative[-1] + slack[-1]
    below = cumulative[k - 2] + slack[k - 2] < p * total_lo if k >= 2 else True
    return bool(below and cumulative[k - 1] - slack[k - 1] >= p * total_hi)


def _entropy_certified(s: Spectrum) -> bool:
    # p_i = σ_i/Σσ; σ_i moved by e_i changes H by −Σ p_i e_i (log p_i + H) to first order
    p = s.sv.astype(np.float64) / float(np.sum(s.sv))
    ok = p > 0
    h = -float(np.sum(p[ok] * np.log(p[ok])))
    change = float(np.sum(p[ok] * s.rel_err[ok] * np.abs(np.log(p[ok]) + h)))
    return 1.1 * change <= CERT_TOL and bool(np.all(s.rel_err[~ok] < 1.0))


def _alpha_error(s: Spectrum, thresh: float) -> float:
    memo = s.__dict__.setdefault("_alpha_errors", {})
    if thresh not in memo:
        rel_lam = 2.2 * s.rel_err[::-1]  # evals are ascending, σ descending
        memo[thresh] = certified_alpha_error(np.sort(s.sv.astype(np.float64) ** 2), thresh, rel_lam)
    return memo[thresh]


@register("spectral_norm", "spectrum", "spectral", certify=lambda s: s.rel_err[0] <= CERT_TOL)
def spectral_norm(s: Spectrum) -> float:
    """Largest singular value σ_max (operator 2-norm)."""
    return float(s.sv[0])


@register("stable_rank", "spectrum", "spectral", certify=lambda s: _energy_error(s) + 2.2 * s.rel_err[0] <= CERT_TOL)
def stable_rank(s: Spectrum) -> float:
    """‖W‖_F² / σ_max²."""
    return s.energy / float(s.sv[0]) ** 2


@register("numerical_rank", "spectrum", "spectral", from_config={"tol": "rank_tol"}, integer=True,
          certify=_rank_certified)
def numerical_rank(s: Spectrum, tol: float | None = None) -> int:
    """Count of σ above tol (default σ_max · max(m, n) · eps64, as numpy.linalg.matrix_rank)."""
    if tol is None:
        tol = float(s.sv[0]) * max(s.shape) * np.finfo(np.float64).eps
    return int(np.count_nonzero(s.sv > tol))


@register("condition_number", "spectrum", "spectral", from_config={"tol": "rank_tol"},
          certify=lambda s, tol=None: _rank_certified(s, tol) and 1.1 * (s.rel_err[0] + s.rel_err[-1]) <= CERT_TOL)
def condition_number(s: Spectrum, tol: float | None = None) -> float:
    """σ_max / σ_min over the min(m, n) singular values; inf when the matrix is rank deficient."""
    if numerical_rank(s, tol) < min(s.shape):
        return math.inf  # σ_min is rounding noise: the ratio would be a meaningless 1e16..1e60
    return float(s.sv[0]) / float(s.sv[-1])


def _energy_rank(s: Spectrum, p: float) -> int:
    cumulative = np.cumsum(s.sv.astype(np.float64) ** 2)
    return int(np.searchsorted(cumulative, p * cumulative[-1], side="left")) + 1


@register("energy_rank_{p}", "spectrum", "spectral", per_energy_level=True, integer=True,
          certify=_energy_rank_certified)
def energy_rank(s: Spectrum, p: float) -> int:
    """Smallest k with Σ_{i≤k} σ_i² ≥ p · Σ σ²."""
    return _energy_rank(s, p)


@register("energy_rank_{p}_ratio", "spectrum", "spectral", per_energy_level=True, certify=_energy_rank_certified)
def energy_rank_ratio(s: Spectrum, p: float) -> float:
    """energy_rank_p / min(m, n)."""
    return _energy_rank(s, p) / min(s.shape)


@register("entropy_rank", "spectrum", "spectral", certify=_entropy_certified)
def entropy_rank(s: Spectrum) -> float:
    """Roy & Vetterli effective rank: exp of the Shannon entropy of σ / Σσ."""
    p = s.sv.astype(np.float64) / float(np.sum(s.sv))
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


@register("alpha", "spectrum", "spectral", from_config={"thresh": "evals_thresh"},
          certify=lambda s, thresh=1e-5: _alpha_error(s, thresh) <= CERT_TOL)
def alpha(s: Spectrum, thresh: float = 1e-5) -> float:
    """Power-law exponent of the ESD (WeightWatcher fit: Clauset MLE, x_min by KS distance)."""
    return s.powerlaw(thresh).alpha


@register("alpha_weighted", "spectrum", "spectral", from_config={"thresh": "evals_thresh"},
          certify=lambda s, thresh=1e-5: _alpha_error(s, thresh)
          + _log_error(math.log10(float(s.sv[0]) ** 2), 2 * s.rel_err[0]) <= CERT_TOL)
def alpha_weighted(s: Spectrum, thresh: float = 1e-5) -> float:
    """alpha · log10(σ_max²), WeightWatcher's alpha-hat."""
    return s.powerlaw(thresh).alpha * math.log10(float(s.sv[0]) ** 2)


@register("log_norm", "spectrum", "spectral", certify=lambda s: _log_error(math.log10(s.energy), _energy_error(s)) <= CERT_TOL)
def log_norm(s: Spectrum) -> float:
    """log10(Σσ²) = log10 ‖W‖_F², as WeightWatcher."""
    return math.log10(s.energy)


@register("log_spectral_norm", "spectrum", "spectral",
          certify=lambda s: _log_error(math.log10(float(s.sv[0]) ** 2), 2 * s.rel_err[0]) <= CERT_TOL)
def log_spectral_norm(s: Spectrum) -> float:
    """log10(σ_max²), as WeightWatcher."""
    return math.log10(float(s.sv[0]) ** 2)
