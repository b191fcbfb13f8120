"""Executors on this machine: a thread pool (the default; torch and LAPACK release the GIL) or a
process pool (for pure-Python work that would hold it). Same windowed loop as the Ray executor."""

from __future__ import annotations

import itertools
import os
from concurrent.futures import FIRST_COMPLETED, Executor as _PoolExecutor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from typing import Any, Callable, Iterable, Iterator

from .base import Done, run_timed


class _PoolBased:
    name = "local"

    def __init__(self, workers: int | None = None):
        self.workers = max(1, workers or min(4, os.cpu_count() or 1))

    @property
    def window(self) -> int:
        return self.workers

    def _pool(self) -> _PoolExecutor:  # pragma: no cover - abstract
        raise NotImplementedError

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Done]:
        queue = iter(items)
        pool = self._pool()
        pending: dict[Future, Any] = {}
        try:
            for item in itertools.islice(queue, self.window):
                pending[pool.submit(run_timed, fn, item)] = item
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    item = pending.pop(fut)
                    value, node, worker, seconds = fut.result()  # fn's exception is raised here
                    nxt = next(queue, _END)
                    if nxt is not _END:
                        pending[pool.submit(run_timed, fn, nxt)] = nxt
                    yield Done(item, value, node, worker, seconds)
        finally:
            for fut in pending:
                fut.cancel()
            pool.shutdown(wait=not pending, cancel_futures=True)


_END = object()


class ThreadExecutor(_PoolBased):
    """Threads of this process: no pickling, shared memory; right for torch/LAPACK work."""

    name = "threads"

    def _pool(self) -> _PoolExecutor:
        return ThreadPoolExecutor(self.workers, thread_name_prefix="layerscope-exec")


class ProcessExecutor(_PoolBased):
    """Processes on this machine: ``fn`` and items must pickle (a module-level function)."""

    name = "processes"

    def _pool(self) -> _PoolExecutor:
        import multiprocessing

        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
