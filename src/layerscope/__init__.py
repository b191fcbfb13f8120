"""layerscope: see inside a transformer's weights, layer by layer and head by head."""

__version__ = "0.1.0"

from .anatomy import Anatomy, Dims  # noqa: E402
from .config import Config  # noqa: E402
from .errors import LayerscopeError  # noqa: E402
from .weights.clusters import ClustersResult, clusters  # noqa: E402
from .change.compare import CompareResult, compare  # noqa: E402
from .weights.embeddings import EmbeddingsResult, GeometryOptions, embeddings  # noqa: E402
from .weights.heads import HeadsResult, heads  # noqa: E402
from .weights.mlp import mlp_down_spectra  # noqa: E402
from .monitor import Monitor  # noqa: E402
from .weights.metrics import all_metrics, register  # noqa: E402
from .pipeline import AnalysisResult, analyze, inspect  # noqa: E402
from .sources import open_source  # noqa: E402
from .change.trajectory import TrajectoryResult, trajectory  # noqa: E402
from . import report, run  # noqa: E402  (modules: report.report(...), run.run(...))
from .probes.probe import ProbeResult, probe  # noqa: E402
from .probes.landscape import LandscapeResult, landscape  # noqa: E402
from .probes.gradients import GradientHealth, gradient_health  # noqa: E402

__all__ = ["ClustersResult", "clusters", "CompareResult", "compare", "Monitor", "TrajectoryResult", "trajectory", "report", "run", "EmbeddingsResult", "GeometryOptions", "embeddings", "mlp_down_spectra",
           "HeadsResult", "heads", "AnalysisResult", "Anatomy", "Config", "Dims", "LayerscopeError", "all_metrics", "analyze", "inspect",
           "open_source", "probe", "ProbeResult", "landscape", "LandscapeResult", "gradient_health", "GradientHealth", "register", "__version__"]
