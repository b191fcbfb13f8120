"""layerscope: see inside a transformer's weights, layer by layer and head by head.

The public API (``layerscope.analyze``, ``heads``, ``embeddings``, ``Monitor``, ...) is resolved on
first use (PEP 562 module ``__getattr__``), not at ``import layerscope``: the analyses need torch,
pandas, scikit-learn and matplotlib, and importing all of them up front made every CLI command,
``--help`` included, take seconds to start. ``from layerscope import analyze`` and
``layerscope.analyze(...)`` work exactly as before; the first use pays the import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> (module relative to this package, attribute in it; None: the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "Anatomy": (".anatomy", "Anatomy"),
    "Dims": (".anatomy", "Dims"),
    "Config": (".config", "Config"),
    "LayerscopeError": (".errors", "LayerscopeError"),
    "ClustersResult": (".weights.clusters", "ClustersResult"),
    "clusters": (".weights.clusters", "clusters"),
    "CompareResult": (".change.compare", "CompareResult"),
    "compare": (".change.compare", "compare"),
    "EmbeddingsResult": (".weights.embeddings", "EmbeddingsResult"),
    "GeometryOptions": (".weights.embeddings", "GeometryOptions"),
    "embeddings": (".weights.embeddings", "embeddings"),
    "HeadsResult": (".weights.heads", "HeadsResult"),
    "heads": (".weights.heads", "heads"),
    "mlp_down_spectra": (".weights.mlp", "mlp_down_spectra"),
    "Monitor": (".monitor", "Monitor"),
    "all_metrics": (".weights.metrics", "all_metrics"),
    "register": (".weights.metrics", "register"),
    "AnalysisResult": (".pipeline", "AnalysisResult"),
    "analyze": (".pipeline", "analyze"),
    "inspect": (".pipeline", "inspect"),
    "open_source": (".sources", "open_source"),
    "TrajectoryResult": (".change.trajectory", "TrajectoryResult"),
    "trajectory": (".change.trajectory", "trajectory"),
    "report": (".report", None),  # modules: layerscope.report.report(...), layerscope.run.run(...)
    "run": (".run", None),
    "probe": (".probes.probe", "probe"),
    "ProbeResult": (".probes.probe", "ProbeResult"),
    "activations": (".probes.activations", "activations"),
    "ActivationsResult": (".probes.activations", "ActivationsResult"),
    "landscape": (".probes.landscape", "landscape"),
    "LandscapeResult": (".probes.landscape", "LandscapeResult"),
    "gradient_health": (".probes.gradients", "gradient_health"),
    "GradientHealth": (".probes.gradients", "GradientHealth"),
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    module = importlib.import_module(module_name, __name__)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value  # resolved once; later lookups never reach __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from . import report, run
    from .anatomy import Anatomy, Dims
    from .change.compare import CompareResult, compare
    from .change.trajectory import TrajectoryResult, trajectory
    from .config import Config
    from .errors import LayerscopeError
    from .monitor import Monitor
    from .pipeline import AnalysisResult, analyze, inspect
    from .probes.activations import ActivationsResult, activations
    from .probes.gradients import GradientHealth, gradient_health
    from .probes.landscape import LandscapeResult, landscape
    from .probes.probe import ProbeResult, probe
    from .sources import open_source
    from .weights.clusters import ClustersResult, clusters
    from .weights.embeddings import EmbeddingsResult, GeometryOptions, embeddings
    from .weights.heads import HeadsResult, heads
    from .weights.metrics import all_metrics, register
    from .weights.mlp import mlp_down_spectra
