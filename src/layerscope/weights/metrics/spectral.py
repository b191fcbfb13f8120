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
from .registry import register


@register("spectral_norm", "spectrum", "spectral")
def spectral_norm(s: Spectrum) -> float:
    """Largest singular value σ_max (operator 2-norm)."""
    return float(s.sv[0])


@register("stable_rank", "spectrum", "spectral")
def stable_rank(s: Spectrum) -> float:
    """‖W‖_F² / σ_max²."""
    return s.energy / float(s.sv[0]) ** 2


@register("numerical_rank", "spectrum", "spectral", from_config={"tol": "rank_tol"}, integer=True)
def numerical_rank(s: Spectrum, tol: float | None = None) -> int:
    """Count of σ above tol (default σ_max · max(m, n) · eps64, as numpy.linalg.matrix_rank)."""
    if tol is None:
        tol = float(s.sv[0]) * max(s.shape) * np.finfo(np.float64).eps
    return int(np.count_nonzero(s.sv > tol))


@register("condition_number", "spectrum", "spectral", from_config={"tol": "rank_tol"})
def condition_number(s: Spectrum, tol: float | None = None) -> float:
    """σ_max / σ_min over the min(m, n) singular values; inf when the matrix is rank deficient."""
    if numerical_rank(s, tol) < min(s.shape):
        return math.inf  # σ_min is rounding noise: the ratio would be a meaningless 1e16..1e60
    return float(s.sv[0]) / float(s.sv[-1])


def _energy_rank(s: Spectrum, p: float) -> int:
    cumulative = np.cumsum(s.sv.astype(np.float64) ** 2)
    return int(np.searchsorted(cumulative, p * cumulative[-1], side="left")) + 1


@register("energy_rank_{p}", "spectrum", "spectral", per_energy_level=True, integer=True)
def energy_rank(s: Spectrum, p: float) -> int:
    """Smallest k with Σ_{i≤k} σ_i² ≥ p · Σ σ²."""
    return _energy_rank(s, p)


@register("energy_rank_{p}_ratio", "spectrum", "spectral", per_energy_level=True)
def energy_rank_ratio(s: Spectrum, p: float) -> float:
    """energy_rank_p / min(m, n)."""
    return _energy_rank(s, p) / min(s.shape)


@register("entropy_rank", "spectrum", "spectral")
def entropy_rank(s: Spectrum) -> float:
    """Roy & Vetterli effective rank: exp of the Shannon entropy of σ / Σσ."""
    p = s.sv.astype(np.float64) / float(np.sum(s.sv))
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


@register("alpha", "spectrum", "spectral", from_config={"thresh": "evals_thresh"})
def alpha(s: Spectrum, thresh: float = 1e-5) -> float:
    """Power-law exponent of the ESD (WeightWatcher fit: Clauset MLE, x_min by KS distance)."""
    return s.powerlaw(thresh).alpha


@register("alpha_weighted", "spectrum", "spectral", from_config={"thresh": "evals_thresh"})
def alpha_weighted(s: Spectrum, thresh: float = 1e-5) -> float:
    """alpha · log10(σ_max²), WeightWatcher's alpha-hat."""
    return s.powerlaw(thresh).alpha * math.log10(float(s.sv[0]) ** 2)


@register("log_norm", "spectrum", "spectral")
def log_norm(s: Spectrum) -> float:
    """log10(Σσ²) = log10 ‖W‖_F², as WeightWatcher."""
    return math.log10(s.energy)


@register("log_spectral_norm", "spectrum", "spectral")
def log_spectral_norm(s: Spectrum) -> float:
    """log10(σ_max²), as WeightWatcher."""
    return math.log10(float(s.sv[0]) ** 2)
