"""Where the monitor's results go. Each sink is independent: one that fails is logged and counted
by the monitor, and the others still get every record.

A sink is any object with ``write(record)`` and ``close()``. Strings name the built-in ones:
``"console"``, ``"jsonl:PATH"``, ``"store"`` / ``"store:PATH"``, ``"wandb"``, ``"tensorboard:DIR"``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd

from ..errors import LayerscopeError

log = logging.getLogger("layerscope.monitor")


@dataclass
class MonitorRecord:
    """One analysed snapshot. ``table``: one row per matrix (metrics, ``drift_prev``,
    ``drift_first``); ``summary``: flat scalars (means over matrices and per role, global drift);
    ``histograms``: per matrix, weight-value bin counts, bin edges and min/max/sum/sum of squares."""

    step: int
    table: pd.DataFrame
    summary: dict[str, float]
    histograms: dict[str, tuple[np.ndarray, np.ndarray, dict[str, float]]] = field(default_factory=dict)
    seconds: float = 0.0
    run: str = ""

    def matrix_scalars(self) -> dict[str, float]:
        """Per-matrix scalars keyed ``<role>/<metric>/layer_<L>`` (or the tensor name outside layers)."""
        out: dict[str, float] = {}
        metrics = [c for c in self.table.columns if c not in _ID_COLUMNS]
        for row in self.table.itertuples(index=False):
            where = f"layer_{int(row.layer)}" if not pd.isna(row.layer) else row.name
            for metric in metrics:
                value = getattr(row, metric)
                if isinstance(value, (int, float, np.number)) and math.isfinite(float(value)):
                    out[f"{row.role}/{metric}/{where}"] = float(value)
        return out

    def to_json(self) -> dict[str, Any]:
        summary = {k: (v if math.isfinite(v) else None) for k, v in self.summary.items()}
        return {"step": self.step, "run": self.run, "seconds": round(self.seconds, 4), "summary": summary,
                "matrices": json.loads(self.table.to_json(orient="records"))}


_ID_COLUMNS = {"name", "layer", "role", "expert", "shape", "dtype", "numel", "error"}


class Sink:
    def write(self, record: MonitorRecord) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


class ConsoleSink(Sink):
    """One short line per snapshot."""

    KEYS = (("entropy_rank/mean", "entropy_rank"), ("stable_rank/mean", "stable_rank"), ("alpha/mean", "alpha"),
            ("drift/from_prev", "drift/prev"), ("drift/from_first", "drift/first"), ("grad/norm", "‖g‖"),
            ("update/ratio/median", "‖Δθ‖/‖θ‖ median (rule of thumb ~1e-3)"), ("noise/B_simple", "B_simple"))

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream

    def write(self, record: MonitorRecord) -> None:
        parts = [f"{label} {record.summary[key]:.4g}" for key, label in self.KEYS
                 if key in record.summary and math.isfinite(record.summary[key])]
        line = f"[layerscope] step {record.step}: {len(record.table)} matrices · " + " · ".join(parts) \
            + f" · {record.seconds:.2f} s"
        print(line, file=self.stream or sys.stderr, flush=True)


class JSONLSink(Sink):
    """One JSON object per line and per snapshot: step, summary, every matrix's metrics."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, record: MonitorRecord) -> None:
        with self._lock:
            self._file.write(json.dumps(record.to_json(), allow_nan=False, default=_jsonable) + "\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value).__name__)


class StoreSink(Sink):
    """Each record into the result store (artifact kind ``monitor``, one per run and step);
    ``load_run`` reads a run back as one table."""

    def __init__(self, path: str | Path | None = None):
        from ..config import Config

        self.path = Path(path) if path else Config().resolved_store()

    def write(self, record: MonitorRecord) -> None:
        from ..store import Store

        with Store(self.path) as store:
            store.put_artifact(f"monitor:{record.run}", "monitor", f"{record.step:012d}",
                               json.loads(json.dumps(record.to_json(), default=_jsonable)))


def load_run(run: str, store: str | Path | None = None) -> pd.DataFrame:
    """Every matrix of every stored snapshot of monitor run ``run``, with its step."""
    from ..config import Config
    from ..store import Store

    with Store(Path(store) if store else Config().resolved_store()) as st:
        payloads = st.artifacts(f"monitor:{run}", "monitor")
    frames = [pd.DataFrame(p["matrices"]).assign(step=p["step"]) for p in payloads]
    if not frames:
        raise LayerscopeError(f"no monitor run named {run!r} in the store")
    return pd.concat(frames, ignore_index=True)


class WandbSink(Sink):
    """Scalars to Weights & Biases, under ``layerscope/``.

    Results reach the sink after training has moved on, and ``wandb.log(step=)`` silently drops
    steps older than the run's current one; so by default the training step is logged as the
    ``layerscope/step`` metric that every ``layerscope/*`` chart uses as its x axis
    (``define_metric``). ``use_step=True`` passes ``step=`` instead, for loops that log nothing else.
    """

    def __init__(self, run: Any = None, per_matrix: bool = True, use_step: bool = False):
        try:
            import wandb
        except ImportError:
            raise LayerscopeError("wandb sink: the wandb package is not installed (pip install wandb)") from None
        self._wandb = wandb
        self._run = run
        self.per_matrix = per_matrix
        self.use_step = use_step
        self._defined = False

    def write(self, record: MonitorRecord) -> None:
        run = self._run or self._wandb.run
        if run is None:
            raise LayerscopeError("wandb sink: no active run (call wandb.init() first or pass run=)")
        data = {f"layerscope/{k}": v for k, v in record.summary.items()}
        if self.per_matrix:
            data.update({f"layerscope/{k}": v for k, v in record.matrix_scalars().items()})
        if self.use_step:
            run.log(data, step=record.step)
            return
        if not self._defined:
            run.define_metric("layerscope/step")
            run.define_metric("layerscope/*", step_metric="layerscope/step")
            self._defined = True
        run.log({**data, "layerscope/step": record.step})


class TensorBoardSink(Sink):
    """Scalars (summary and per matrix) and weight histograms (from the bins the monitor computed)."""

    def __init__(self, logdir: str | Path | None = None, writer: Any = None, per_matrix: bool = True,
                 histograms: bool = True):
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise LayerscopeError("tensorboard sink: the tensorboard package is not installed (pip install tensorboard)") from None
            writer = SummaryWriter(log_dir=str(logdir) if logdir else None)
        self.writer = writer
        self.per_matrix = per_matrix
        self.histograms = histograms

    def write(self, record: MonitorRecord) -> None:
        w = self.writer
        for key, value in record.summary.items():
            w.add_scalar(f"layerscope/{key}", value, record.step)
        if self.per_matrix:
            for key, value in record.matrix_scalars().items():
                w.add_scalar(f"layerscope/{key}", value, record.step)
        if self.histograms:
            for name, (counts, edges, stats) in record.histograms.items():
                w.add_histogram_raw(f"layerscope/weights/{name}", min=stats["min"], max=stats["max"],
                                    num=int(counts.sum()), sum=stats["sum"], sum_squares=stats["sum_squares"],
                                    bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(),
                                    global_step=record.step)
        w.flush()

    def close(self) -> None:
        self.writer.close()


def make_sink(spec: Any) -> Sink:
    """A sink from a spec string (``console``, ``jsonl:PATH``, ``store[:PATH]``, ``wandb``,
    ``tensorboard[:DIR]``) or a sink object, returned as is."""
    if not isinstance(spec, str):
        if not callable(getattr(spec, "write", None)):
            raise LayerscopeError(f"a sink needs a write(record) method, got {type(spec).__name__}")
        return spec
    kind, _, arg = spec.partition(":")
    if kind == "console":
        return ConsoleSink()
    if kind == "jsonl":
        if not arg:
            raise LayerscopeError("the jsonl sink needs a path: 'jsonl:monitor.jsonl'")
        return JSONLSink(arg)
    if kind == "store":
        return StoreSink(arg or None)
    if kind == "wandb":
        return WandbSink()
    if kind == "tensorboard":
        return TensorBoardSink(arg or None)
    raise LayerscopeError(f"unknown sink {spec!r} (known: console, jsonl:PATH, store[:PATH], wandb, tensorboard[:DIR])")
