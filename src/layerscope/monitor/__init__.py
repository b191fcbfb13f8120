"""Analyse a model's weights while it trains: ``Monitor(model, every=N)``, then ``monitor.step(step)``."""

from .core import DEFAULT_METRICS, Monitor, MonitorStats, memory_used_fraction
from .sinks import (ConsoleSink, JSONLSink, MonitorRecord, Sink, StoreSink, TensorBoardSink, WandbSink, load_run,
                    make_sink)

__all__ = ["DEFAULT_METRICS", "Monitor", "MonitorStats", "memory_used_fraction", "ConsoleSink", "JSONLSink",
           "MonitorRecord", "Sink", "StoreSink", "TensorBoardSink", "WandbSink", "load_run", "make_sink"]
