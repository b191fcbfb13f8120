"""The executor on a Ray cluster (``--cluster ray`` or ``--cluster ray://HOST:PORT``).

Retry policy: a task whose worker process or node dies (killed, out of memory, a crash inside
LAPACK, a node lost) is resubmitted by Ray up to ``max_retries`` = 3 times, on any node
(``retry_exceptions=False``: an exception raised by the task itself is not retried — bad input
would fail the same way again, and layerscope's tasks already turn bad input into rows with an
``error``). After the retries are spent the run stops with one line naming the failure; what the
driver stored until then stays, and a re-run resumes. Ctrl-C (or any exception) on the driver
cancels every task still in flight (``ray.cancel(force=True)``).

Ray is imported here only: layerscope never imports it unless a cluster was asked for.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator

from ..errors import LayerscopeError
from .base import Done

MAX_RETRIES = 3


def _on_worker(fn: Callable[[Any], Any], item: Any, threads: int) -> tuple[Any, str, int, float]:
    """Runs in a Ray worker process: ``fn(item)`` with ``threads`` BLAS/torch threads."""
    import ray

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads, user_api="blas")
    except ImportError:  # pragma: no cover - threadpoolctl is a layerscope dependency
        pass
    ctx = ray.get_runtime_context()
    node = f"{ray.util.get_node_ip_address()}/{ctx.get_node_id()[:6]}"
    started = time.perf_counter()
    value = fn(item)
    return value, node, os.getpid(), time.perf_counter() - started


def connect(address: str | None = None) -> None:
    """Join ``address`` (``ray://HOST:PORT``), else $RAY_ADDRESS, else a running local instance,
    else start one on this machine (no dashboard)."""
    import ray

    if ray.is_initialized():
        return
    quiet = dict(logging_level="WARNING", log_to_driver=True)
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            ray.init(address=address, **quiet)
            return
        try:
            ray.init(address="auto", **quiet)  # a `ray start --head` on this machine
        except (ConnectionError, RuntimeError, ValueError):
            ray.init(include_dashboard=False, **quiet)
    except Exception as exc:  # connection refused, version mismatch, ...
        raise LayerscopeError(f"cannot reach the Ray cluster {address or '(local)'}: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


class RayExecutor:
    """Tasks on a Ray cluster, ``threads`` CPUs each (Ray schedules one task per ``threads`` cores)."""

    name = "ray"

    def __init__(self, address: str | None = None, *, threads: int = 1, max_retries: int = MAX_RETRIES,
                 max_in_flight: int | None = None):
        import ray

        connect(address)
        self.ray = ray
        self.threads = threads
        self.max_retries = max_retries
        self.max_in_flight = max_in_flight  # None: one task per core of the cluster
        self.submitted = 0  # tasks sent to the cluster by this process (a re-run of stored work sends none)
        self.busy_seconds = 0.0  # summed time inside tasks on the workers
        self._remote = ray.remote(_on_worker).options(num_cpus=threads, max_retries=max_retries,
                                                      retry_exceptions=False, name="layerscope_task")

    @property
    def window(self) -> int:
        """One task per core of the cluster in flight: each worker holds one piece at a time."""
        if self.max_in_flight:
            return self.max_in_flight
        cpus = int(self.ray.cluster_resources().get("CPU", 1))
        return max(1, cpus // self.threads)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Done]:
        ray = self.ray
        queue = iter(items)
        fn_ref = ray.put(fn)
        pending: dict[Any, Any] = {}

        def submit() -> None:
            for item in queue:
                pending[self._remote.remote(fn_ref, item, self.threads)] = item
                self.submitted += 1
                if len(pending) >= window:
                    return

        window = self.window
        try:
            submit()
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    item = pending.pop(ref)
                    value, node, worker, seconds = self._get(ref)
                    self.busy_seconds += seconds
                    submit()
                    yield Done(item, value, node, worker, seconds)
        finally:
            for ref in pending:  # Ctrl-C, an error, or the caller stopped early
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # already finished or gone
                    pass

    def _get(self, ref: Any) -> Any:
        from ray import exceptions as rex

        try:
            return self.ray.get(ref)
        except rex.RayTaskError as err:  # the task itself raised: re-raise what it raised
            cause = getattr(err, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from None
            raise
        except rex.RayError as err:  # worker or node lost more often than the retries allow
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise LayerscopeError(f"a Ray task failed {self.max_retries + 1} times (retries spent): "
                                  f"{type(err).__name__}: {first}") from None
