"""Where independent pieces of work run: threads, processes, or a Ray cluster, behind one interface.

An :class:`Executor` has one verb::

    for done in executor.map(fn, items):   # yields as pieces finish, in completion order
        done.item, done.value, done.node, done.worker, done.seconds

``fn`` is called once per item, on some worker, and must be a module-level function (or a
picklable callable) whose result is picklable: for a process or Ray executor both travel between
processes. Never more than ``executor.window`` items are in flight, so memory on every worker
and on the driver is bounded by the largest items in flight, never by how many there are. An
exception raised by ``fn`` is re-raised by ``map`` on the driver (after cancelling what is still
in flight); a worker *process* that dies is the executor's business (Ray retries the task).
Closing the iterator early — ``break``, an exception, Ctrl-C — cancels what is still in flight.

Why a protocol of our own rather than ``concurrent.futures``: the same loop must run on a Ray
cluster, and a caller (a probe evaluating landscape grid points, a trajectory over checkpoints)
must be able to submit its pieces without knowing which engine runs them. The layerscope-specific
pieces (analysing tensors, checkpoints) live in :mod:`layerscope.executor.tasks`; the store stays
with the driver: tasks return rows and store records, and the driver writes them.

``open_executor(None | "threads" | "processes" | "ray" | "ray://host:port")`` picks one; Ray is
imported only for the last two.
"""

from __future__ import annotations

from .base import Done, Executor, ExecutorStats
from .local import ProcessExecutor, ThreadExecutor

__all__ = ["Done", "Executor", "ExecutorStats", "ThreadExecutor", "ProcessExecutor", "open_executor", "parse_cluster"]

_OPEN: dict[str, Executor] = {}


def parse_cluster(spec: str | None) -> str | None:
    """The normalised cluster spec, or a LayerscopeError naming the accepted forms."""
    from ..errors import LayerscopeError

    if spec is None or spec == "":
        return None
    if not isinstance(spec, str):
        raise LayerscopeError(f"config: cluster must be 'ray' or 'ray://HOST:PORT', got {spec!r}")
    text = spec.strip()
    if text == "ray" or (text.startswith("ray://") and len(text) > len("ray://")):
        return text
    raise LayerscopeError(f"cluster: expected 'ray' (start or join a local Ray instance; RAY_ADDRESS is honoured) "
                          f"or 'ray://HOST:PORT' (an existing cluster), got {spec!r}")


def open_executor(spec: str | None, workers: int = 0) -> Executor:
    """An executor for ``spec``; cluster executors are opened once per process and reused."""
    if spec in (None, "", "threads"):
        return ThreadExecutor(workers or None)
    if spec == "processes":
        return ProcessExecutor(workers or None)
    spec = parse_cluster(spec)
    if spec not in _OPEN:
        try:
            import ray  # noqa: F401
        except ImportError:
            from ..errors import LayerscopeError

            raise LayerscopeError(f"--cluster {spec}: Ray is not installed (pip install 'layerscope[ray]')") from None
        from .ray_executor import RayExecutor

        _OPEN[spec] = RayExecutor(None if spec == "ray" else spec)
    return _OPEN[spec]


def close_clusters() -> None:
    """Stop the Ray instance this process started (a joined cluster just loses this driver).
    For exits that skip ``atexit`` (the CLI's ``os._exit`` after Ctrl-C); cheap without Ray."""
    import sys

    if "layerscope.executor.ray_executor" in sys.modules and _OPEN:
        _OPEN.clear()
        try:
            sys.modules["ray"].shutdown()
        except Exception:  # already down
            pass
