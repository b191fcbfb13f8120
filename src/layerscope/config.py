"""One configuration object for every analysis, loadable from JSON, TOML or YAML.

Unknown keys are rejected with the key named: a typo in a config file must not silently fall
back to a default and produce numbers the user did not ask for.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import LayerscopeError

DTYPES = ("float64", "float32")


@dataclass(frozen=True)
class Config:
    """Everything an analysis run can be told.

    metrics: metric names or group names (``stats``, ``spectral``, ``all``); None means all.
    energy_levels: the p of each ``energy_rank_<p>`` column (fraction of Σσ² to capture).
    rank_tol: absolute tolerance for ``numerical_rank``; None is NumPy's ``matrix_rank`` default
        (σ_max · max(m, n) · eps64).
    evals_thresh: eigenvalues of WᵀW at or below this are ignored by the power-law fit
        (WeightWatcher's ``EVALS_THRESH``).
    dtype: precision of the spectrum. ``float64`` (default) keeps every reported number within
        1e-4 of a float64 SVD; ``float32`` is faster and loses the small singular values
        (condition number, numerical rank) of ill-conditioned matrices.
    device: ``cpu``, ``cuda``/``cuda:N`` or ``auto`` (cuda when available). On CUDA out-of-memory
        a matrix is recomputed on the CPU.
    workers: tensors analysed at once (0 = one per CPU core, at most 4).
    store: path of the SQLite result store; None = ``$LAYERSCOPE_CACHE_DIR/results.sqlite`` or the
        user cache directory.
    cache: read cached results from the store (results are always written).
    slices: also analyse the q/k/v parts of fused matrices and each MoE expert separately.
    seed: seed for anything random (kept in the store key of randomised metrics).
    cluster: None (this machine), ``ray`` (start or join a local Ray instance; $RAY_ADDRESS is
        honoured) or ``ray://HOST:PORT`` (an existing Ray cluster): independent pieces (tensors,
        checkpoints) run there and the rows come back to this process's store. See README, Cluster.
    """

    metrics: tuple[str, ...] | None = None
    energy_levels: tuple[float, ...] = (0.90, 0.98, 0.99)
    rank_tol: float | None = None
    evals_thresh: float = 1e-5
    dtype: str = "float64"
    device: str = "cpu"
    workers: int = 0
    store: str | None = None
    cache: bool = True
    slices: bool = True
    seed: int = 0
    cluster: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.metrics, str):
            object.__setattr__(self, "metrics", tuple(m.strip() for m in self.metrics.split(",") if m.strip()))
        elif self.metrics is not None:
            object.__setattr__(self, "metrics", tuple(self.metrics))
        object.__setattr__(self, "energy_levels", tuple(float(p) for p in self.energy_levels))
        if self.dtype not in DTYPES:
            raise LayerscopeError(f"config: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not (self.device in ("cpu", "cuda", "auto") or str(self.device).startswith("cuda:")):
            raise LayerscopeError(f"config: device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise LayerscopeError(f"config: workers must be an integer >= 0, got {self.workers!r}")
        for p in self.energy_levels:
            if not 0.0 < p < 1.0:
                raise LayerscopeError(f"config: energy_levels must lie strictly between 0 and 1, got {p}")
        if self.cluster is not None:
            from .executor import parse_cluster

            object.__setattr__(self, "cluster", parse_cluster(self.cluster))
        if self.rank_tol is not None and self.rank_tol < 0:
            raise LayerscopeError(f"config: rank_tol must be >= 0, got {self.rank_tol}")

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "config") -> "Config":
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise LayerscopeError(f"{origin}: unknown config key {key!r} (known keys: {', '.join(sorted(known))})")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Config":
        path = Path(path)
        if not path.is_file():
            raise LayerscopeError(f"{path}: config file not found")
        text = path.read_text()
        try:
            if path.suffix == ".json":
                data = json.loads(text)
            elif path.suffix == ".toml":
                try:
                    import tomllib
                except ModuleNotFoundError:  # Python 3.10
                    import tomli as tomllib
                data = tomllib.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                raise LayerscopeError(f"{path}: config must be .json, .toml, .yaml or .yml")
        except LayerscopeError:
            raise
        except Exception as exc:  # parse errors of any of the three formats
            raise LayerscopeError(f"{path}: cannot parse config: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise LayerscopeError(f"{path}: config must be a mapping of keys to values")
        return cls.from_dict(data, origin=str(path))

    def replace(self, **overrides: Any) -> "Config":
        """A copy with ``overrides`` applied; None values mean "keep", unknown keys are rejected."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        merged = {**dataclasses.asdict(self), **overrides}
        return Config.from_dict(merged, origin="override")

    # -- derived ------------------------------------------------------------------------------
    def resolved_workers(self) -> int:
        if self.workers:
            return self.workers
        return max(1, min(4, os.cpu_count() or 1))

    def resolved_store(self) -> Path:
        if self.store:
            return Path(self.store).expanduser()
        base = os.environ.get("LAYERSCOPE_CACHE_DIR")
        if base:
            return Path(base) / "results.sqlite"
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(xdg) / "layerscope" / "results.sqlite"
