"""The training monitor: analyse a model's weights while it trains, off the training thread.

The training loop only ever pays for a copy of the weights (see ``snapshot``): everything else
— the metrics, drift, the sinks — runs in one background thread at low OS priority (nice 10: at
19 it starves and snapshots get skipped) with a single torch and BLAS thread (with more, the
analysis's thread teams spin on the cores training needs: 0.80 of plain throughput, 0.93–0.98 now). The monitor
must never hurt training, so:

- the queue is bounded: when every slot is busy a snapshot is skipped and counted (or, with
  ``when_full="block"``, the loop waits for a slot);
- a memory guard skips the snapshot, and says so, when system memory use is above ``memory_limit``;
- any exception inside the monitor (a metric, a sink, the worker itself) is logged and counted,
  never raised into training;
- ``close()`` drains with a timeout, and the worker is a daemon thread, so a stuck or crashed
  analysis cannot keep the training process from exiting;
- in a distributed run only rank 0 snapshots and analyses.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import queue
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from ..config import Config
from ..change.drift import pair_norms
from ..errors import LayerscopeError
from .sinks import MonitorRecord, Sink, make_sink
from .snapshot import Snapshot, Snapshotter, live_tensors, snapshot_bytes

log = logging.getLogger("layerscope.monitor")

#: Cheap and telling: the spectrum is computed once per matrix and shared by these.
DEFAULT_METRICS = ("frobenius_norm", "spectral_norm", "stable_rank", "entropy_rank", "energy_rank_{p}_ratio", "alpha")
HISTOGRAM_BINS = 64
WHEN_FULL = ("skip", "block")


@dataclass
class MonitorStats:
    submitted: int = 0
    analysed: int = 0
    skipped_full: int = 0
    skipped_memory: int = 0
    errors: int = 0
    sink_errors: int = 0
    blocked_seconds: float = 0.0  # time the training thread spent inside the monitor (snapshots, gradients)
    gradient_seconds: float = 0.0  # of which reading gradients (norms, micro-batch increments)
    analysis_seconds: float = 0.0


def memory_used_fraction() -> float | None:
    """System memory in use, 0..1 (None when it cannot be read)."""
    try:
        import psutil

        return psutil.virtual_memory().percent / 100.0
    except ImportError:
        pass
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                info[key] = int(value.split()[0])
        return 1.0 - info["MemAvailable"] / info["MemTotal"]
    except (OSError, KeyError, ValueError):
        return None


def _is_rank_zero() -> bool:
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return True
    return dist.get_rank() == 0


class Monitor:
    """Analyse ``model``'s weights every ``every`` steps while it trains.

    ``monitor.step(step)`` in the loop (a snapshot when ``step % every == 0``), or
    ``monitor.submit(step)`` at chosen steps; ``monitor.close()`` at the end (or use ``with``).

    metrics: metric names or groups (see ``layerscope metrics``); energy-rank names may use ``{p}``.
    sinks: sink objects or specs ``console``, ``jsonl:PATH``, ``store[:PATH]``, ``wandb``, ``tensorboard[:DIR]``.
    queue_size: snapshots waiting for analysis at most (one more is being analysed); each holds a
        host copy of the weights.
    when_full: ``skip`` (count and go on) or ``block`` (the loop waits for a free slot).
    memory_limit: skip a snapshot while system memory use is above this fraction.
    drift: also report drift from the first and the previous snapshot (keeps two more host copies).
    gradients: gradient health (see ``monitor.gradients``): per-matrix and per-layer gradient norms
        at snapshot steps, read by ``step()`` before the loop zeroes them (or by
        ``observe_gradients`` from a callback), and the noise scale from ``observe_micro_batch``.
    update_ratio: also copy the weights once more at the step after each snapshot, for the
        update-to-weight ratio ‖Δθ‖/‖θ‖ of one optimizer step (one more host copy per slot).
    """

    def __init__(self, model: torch.nn.Module, every: int = 100, metrics: Iterable[str] | None = DEFAULT_METRICS,
                 sinks: Iterable[Any] = ("console",), *, queue_size: int = 1, when_full: str = "skip",
                 memory_limit: float = 0.9, drift: bool = True, config: Config | None = None,
                 run: str | None = None, close_timeout: float = 60.0, low_priority: bool = True,
                 gradients: bool = True, update_ratio: bool = True):
        if not isinstance(every, int) or every < 1:
            raise LayerscopeError(f"Monitor: every must be a positive integer, got {every!r}")
        if when_full not in WHEN_FULL:
            raise LayerscopeError(f"Monitor: when_full must be one of {', '.join(WHEN_FULL)}, got {when_full!r}")
        if not 0 < memory_limit <= 1:
            raise LayerscopeError(f"Monitor: memory_limit must lie in (0, 1], got {memory_limit}")
        if queue_size < 1:
            raise LayerscopeError(f"Monitor: queue_size must be >= 1, got {queue_size}")
        self.every, self.when_full, self.memory_limit, self.drift = every, when_full, memory_limit, drift
        self.close_timeout, self.low_priority = close_timeout, low_priority
        self.run = run or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        base = config or Config()
        self.config = base.replace(metrics=_expand(metrics, base) if metrics is not None else base.metrics,
                                   workers=1, slices=False)
        from ..weights.metrics import select_metrics

        select_metrics(self.config)  # unknown metric names fail here, not in the background
        self.stats = MonitorStats()
        self.active = _is_rank_zero()
        self.sinks: list[Sink] = [make_sink(s) for s in sinks] if self.active else []
        self._model_config = _config_dict(model)
        self._snapshots = Snapshotter(model, queue_size + 1)
        self._queue: queue.Queue[Snapshot | None] = queue.Queue()  # bounded by the snapshot slots
        self._first: dict[str, torch.Tensor] | None = None
        self._prev: dict[str, torch.Tensor] | None = None
        self._closed = False
        self._warned: set[str] = set()
        self._worker: threading.Thread | None = None
        self._grads = None
        self._held: Snapshot | None = None  # a snapshot waiting for its companion copy (update ratio)
        self.update_ratio = update_ratio
        if self.active and gradients:
            from .gradients import GradientTracker

            self._grads = GradientTracker(live_tensors(model))
        if self.active:
            self._worker = threading.Thread(target=self._work, name="layerscope-monitor", daemon=True)
            self._worker.start()
            atexit.register(_close_at_exit, weakref.ref(self))

    # -- training side ------------------------------------------------------------------------
    def step(self, step: int) -> bool:
        """Call once per optimizer step, before the loop zeroes the gradients (or at any point when
        ``observe_gradients`` is used). Snapshot when ``step`` is a multiple of ``every``; True when a
        snapshot was queued."""
        if not self.active or self._closed:
            return False
        extra: dict[str, Any] = {}
        if self._held is not None or self._grads is not None:
            self._timed(lambda: self._gradient_step(step, extra), f"gradients at step {step}")
        if step % self.every:
            return False
        return self.submit(step, extra, _hold=True)

    def observe_gradients(self, step: int) -> None:
        """Read the gradient norms now, for the snapshot of ``step`` (from a callback that runs before
        the optimizer step when ``step()`` runs after ``zero_grad``, as in the HF and Lightning ones)."""
        if self._grads is None or self._closed or step % self.every:
            return
        self._timed(lambda: setattr(self._grads, "pending", (step, self._grads.grad_sq_norms())))

    def observe_micro_batch(self, batch_size: int) -> None:
        """After each micro-batch's ``backward()`` under gradient accumulation: the noise scale from
        the micro-batch (``batch_size`` examples) and accumulated gradients (see ``monitor.gradients``)."""
        if self._grads is not None and not self._closed:
            self._timed(lambda: self._grads.observe_micro_batch(batch_size))

    def observe_batch_sizes(self, small_sq_norm: float, small_batch: float, big_sq_norm: float, big_batch: float) -> None:
        """Squared gradient norms at two batch sizes measured by the caller (e.g. one rank's gradient
        before DDP's all-reduce and the all-reduced one): the noise scale at the next snapshot."""
        if self._grads is not None and not self._closed:
            self._grads.observe_batch_sizes(small_sq_norm, small_batch, big_sq_norm, big_batch)

    def _gradient_step(self, step: int, extra: dict[str, Any]) -> None:
        """At ``step()``: release a held snapshot, and read this step's gradient norms and noise scale into ``extra``."""
        if self._held is not None and step != self._held.step:
            self._release_held(step)
        if self._grads is None:
            return
        if step % self.every == 0:
            pending = self._grads.pending
            grad_sq = pending[1] if pending is not None and pending[0] == step else self._grads.grad_sq_norms()
            if grad_sq is not None:
                extra["grad_sq"] = grad_sq
        self._grads.end_step()
        if step % self.every == 0:
            noise = self._grads.take_noise()
            if noise:
                extra["noise"] = noise
            self._grads.pending = None

    def _timed(self, fn, label: str = "gradients") -> None:
        """Run ``fn`` on the training thread: its time counts as blocked, and it never raises into training."""
        started = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # never into training
            self._error(f"{label} failed: {type(exc).__name__}: {exc}")
        finally:
            spent = time.perf_counter() - started
            self.stats.blocked_seconds += spent
            self.stats.gradient_seconds += spent

    def _release_held(self, step: int | None) -> None:
        """Queue the held snapshot, with the companion copy of the weights at ``step`` (None: without)."""
        snap, self._held = self._held, None
        if step is not None:
            try:
                self._snapshots.companion(snap, step)
            except Exception as exc:
                self._error(f"update-ratio copy at step {step} failed: {type(exc).__name__}: {exc}")
        self._queue.put(snap)

    def submit(self, step: int, extra: dict[str, Any] | None = None, _hold: bool = False) -> bool:
        """Snapshot the weights now, for analysis in the background; False when skipped. (From
        ``step()``, the snapshot waits for the next ``step()`` for its update-ratio copy.)"""
        if not self.active or self._closed:
            return False
        started = time.perf_counter()
        try:
            return self._submit(step, extra or {}, _hold)
        except Exception as exc:  # never into training
            self._error(f"snapshot at step {step} failed: {type(exc).__name__}: {exc}")
            return False
        finally:
            self.stats.blocked_seconds += time.perf_counter() - started

    def _submit(self, step: int, extra: dict[str, Any], hold: bool = False) -> bool:
        if self._worker is None or not self._worker.is_alive():
            self._warn_once("worker", "monitor worker is not running; snapshots are skipped")
            self.stats.skipped_full += 1
            return False
        slot = self._acquire_slot()
        if slot is None:
            self.stats.skipped_full += 1
            self._warn_once("full", f"monitor busy at step {step}: snapshot skipped (queue full; counted in stats.skipped_full)")
            return False
        used = memory_used_fraction()
        needed = 0 if self._snapshots.allocated() else snapshot_bytes(live_tensors(self._snapshots.model))
        if used is not None and (used > self.memory_limit or used + needed / _total_memory() > self.memory_limit):
            self._snapshots.give_back(slot)
            self.stats.skipped_memory += 1
            log.warning("layerscope monitor: step %s skipped: system memory at %.0f%% (limit %.0f%%)",
                        step, 100 * used, 100 * self.memory_limit)
            return False
        try:
            snap = self._snapshots.take(step, slot)
        except BaseException:
            self._snapshots.give_back(slot)  # a failed copy must not leak its slot
            raise
        snap.taken_at = time.perf_counter()
        snap.extra.update(extra)
        self.stats.submitted += 1
        if self._held is not None:  # a snapshot every step: no companion for the previous one
            self._release_held(None)
        if hold and self._grads is not None and self.update_ratio:
            self._held = snap  # queued at the next step(), with one optimizer update's copy
        else:
            self._queue.put(snap)
        return True

    def _acquire_slot(self) -> int | None:
        if self.when_full != "block":
            return self._snapshots.acquire()
        while (slot := self._snapshots.acquire(timeout=0.5)) is None:
            if self._worker is None or not self._worker.is_alive():  # never wait on a dead worker
                return None
        return slot

    # -- background side ----------------------------------------------------------------------
    def _work(self) -> None:
        try:
            self._work_loop()
        except BaseException as exc:  # the worker dies, training does not: submit() notices and skips
            self.stats.errors += 1
            log.error("layerscope monitor: worker stopped: %s: %s", type(exc).__name__, exc)

    def _work_loop(self) -> None:
        if self.low_priority:
            _lower_thread_priority()
        # One intra-op thread for the analysis. torch's OpenMP and MKL thread counts are
        # per calling thread, so this leaves the training thread's setting as it was (tested);
        # without it every small op of the analysis wakes a team of spinning threads that
        # compete with training for the cores.
        from ..pipeline import set_worker_threads

        set_worker_threads(1)
        while True:
            snap = self._queue.get()
            if snap is None:
                return
            try:
                snap.wait()
                # NumPy's BLAS pool threads were started by the main thread at normal priority:
                # run BLAS in this (niced) thread instead. Training uses torch's own threads.
                with threadpool_limits(limits=1, user_api="blas"):
                    record = self._analyse(snap)
            except Exception as exc:
                self._error(f"analysis of step {snap.step} failed: {type(exc).__name__}: {exc}")
                record = None
            finally:
                self._snapshots.release(snap)
            if record is not None:
                self._dispatch(record)

    def _analyse(self, snap: Snapshot) -> MonitorRecord:
        from ..pipeline import analyze
        from ..sources.module import StateDictSource

        started = time.perf_counter()
        tensors = snap.tensors
        source = StateDictSource(tensors, label=self.run, config=self._model_config, step=snap.step)
        table = analyze(source, self.config, manage_threads=False).table
        errors = table["error"].astype(bool).sum() if "error" in table else 0
        if errors:
            self._warn_once("metric", f"monitor: {errors} matrices had errors at step {snap.step}: "
                                      f"{table.loc[table['error'].astype(bool), 'error'].iloc[0]}")
        summary: dict[str, float] = {}
        if self.drift:
            self._add_drift(table, tensors, summary)
        matrices = table[table["shape"].str.contains("×")].copy()
        if self._grads is not None:
            from .gradients import gradient_columns

            gradient_columns(matrices, tensors, snap.extra, self._grads.names, summary)
        histograms = {name: _histogram(tensors[name]) for name in matrices["name"] if name in tensors}
        summary.update(_summarise(matrices))
        return MonitorRecord(snap.step, matrices.reset_index(drop=True), summary, histograms,
                             time.perf_counter() - started, self.run)

    def _add_drift(self, table: pd.DataFrame, tensors: dict[str, torch.Tensor], summary: dict[str, float]) -> None:
        copy = {n: t.clone() for n, t in tensors.items()}  # the slot's buffers are reused
        for ref_name, ref in (("prev", self._prev), ("first", self._first)):
            values, num, den = [], 0.0, 0.0
            for name in table["name"]:
                if ref is None or name not in ref or name not in tensors or ref[name].shape != tensors[name].shape:
                    values.append(math.nan)
                    continue
                ref_sq, _, _, diff_sq = pair_norms(ref[name], tensors[name])
                values.append(math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else math.nan)
                if tensors[name].dim() == 2:  # the global drift is over matrices, as in trajectories
                    num, den = num + diff_sq, den + ref_sq
            table[f"drift_{ref_name}"] = values
            summary[f"drift/from_{ref_name}"] = math.sqrt(num / den) if den > 0 else math.nan
        self._prev = copy
        if self._first is None:
            self._first = copy

    def _dispatch(self, record: MonitorRecord) -> None:
        self.stats.analysed += 1
        self.stats.analysis_seconds += record.seconds
        for sink in self.sinks:
            try:
                sink.write(record)
            except Exception as exc:  # one sink failing must not cost the others
                self.stats.sink_errors += 1
                self._warn_once(f"sink:{type(sink).__name__}",
                                f"monitor sink {type(sink).__name__} failed: {type(exc).__name__}: {exc}")

    # -- ending -------------------------------------------------------------------------------
    def close(self, timeout: float | None = None) -> MonitorStats:
        """Wait (at most ``timeout`` s, default ``close_timeout``) for queued snapshots, then close the sinks."""
        if self._closed:
            return self.stats
        if self._held is not None:
            self._release_held(None)
        self._closed = True
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(self.close_timeout if timeout is None else timeout)
            if self._worker.is_alive():
                log.warning("layerscope monitor: analysis still running after %.0f s; leaving it behind",
                            self.close_timeout if timeout is None else timeout)
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                self.stats.sink_errors += 1
                log.warning("layerscope monitor: closing %s failed: %s", type(sink).__name__, exc)
        return self.stats

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- helpers ------------------------------------------------------------------------------
    def _error(self, message: str) -> None:
        self.stats.errors += 1
        log.warning("layerscope monitor: %s", message)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("layerscope %s", message)


def _close_at_exit(ref: "weakref.ref[Monitor]") -> None:
    monitor = ref()
    if monitor is not None and not monitor._closed:
        monitor.close(timeout=min(5.0, monitor.close_timeout))


def _expand(metrics: Iterable[str], config: Config) -> tuple[str, ...]:
    out: list[str] = []
    for m in metrics:
        if "{p}" in m:
            from ..weights.metrics.registry import level_tag

            out.extend(m.format(p=level_tag(p)) for p in config.energy_levels)
        else:
            out.append(m)
    return tuple(out)


def _config_dict(model: torch.nn.Module) -> dict[str, Any] | None:
    from ..sources.module import unwrap

    config = getattr(unwrap(model), "config", None)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config) if isinstance(config, dict) else None


def _total_memory() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return math.inf


def _lower_thread_priority() -> None:
    """Nice this thread 10 below the training thread (Linux threads have their own nice value; threads
    it starts inherit it). Relative, never absolute: in a process already niced past 10, an absolute
    10 would raise the analysis above training (root may lower a nice value)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + 10, 19))
    except (AttributeError, OSError, PermissionError):
        pass


def _histogram(tensor: torch.Tensor) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    x = tensor.detach().reshape(-1).double()
    x = x[torch.isfinite(x)]
    if x.numel() == 0:
        return np.zeros(HISTOGRAM_BINS), np.linspace(0, 1, HISTOGRAM_BINS + 1), {"min": 0.0, "max": 0.0, "sum": 0.0, "sum_squares": 0.0}
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        hi = lo + 1e-12
    counts = torch.histc(x, HISTOGRAM_BINS, lo, hi).numpy()
    return counts, np.linspace(lo, hi, HISTOGRAM_BINS + 1), {"min": lo, "max": hi, "sum": float(x.sum()),
                                                             "sum_squares": float((x * x).sum())}


def _summarise(matrices: pd.DataFrame) -> dict[str, float]:
    """Means over all matrices (``<metric>/mean``) and per role (``<metric>/<role>``)."""
    out: dict[str, float] = {}
    skip = {"name", "layer", "role", "expert", "shape", "dtype", "numel", "error"}
    for col in matrices.columns:
        if col in skip or not pd.api.types.is_numeric_dtype(matrices[col]):
            continue
        values = pd.to_numeric(matrices[col], errors="coerce").replace([np.inf, -np.inf], np.nan)
        if values.notna().any():
            out[f"{col}/mean"] = float(values.mean())
        for role, group in values.groupby(matrices["role"]):
            if group.notna().any():
                out[f"{col}/{role}"] = float(group.mean())
    return out
