"""Metrics: pure functions of a tensor's moments or a matrix's spectrum, registered by name."""

from . import moments as _moments  # noqa: F401  (registers the elementwise statistics)
from . import spectral as _spectral  # noqa: F401  (registers the spectral metrics)
from . import mp as _mp  # noqa: F401  (registers the Marchenko–Pastur null metrics)
from .moments import Moments, moments
from .registry import Metric, all_metrics, register, select_metrics

__all__ = ["Metric", "Moments", "all_metrics", "moments", "register", "select_metrics"]
