"""The executor protocol and what it yields (see the package docstring for the contract)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable


@dataclass
class Done:
    """One finished item: its ``value`` (what ``fn`` returned), where it ran and for how long."""

    item: Any
    value: Any
    node: str  # the host (Ray: the node's IP address)
    worker: int  # the process id that ran it
    seconds: float  # time inside ``fn`` on the worker


@runtime_checkable
class Executor(Protocol):
    name: str

    @property
    def window(self) -> int:
        """Items in flight at most (about the number of worker processes or threads)."""

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Done]:
        """Call ``fn`` on every item; yield each :class:`Done` as it finishes (completion order)."""


@dataclass
class ExecutorStats:
    """Counts on the driver, for progress lines and for tests: per node, tasks done and busy seconds."""

    started: float = field(default_factory=time.perf_counter)
    done: int = 0
    per_node: dict[str, list[float]] = field(default_factory=dict)  # node -> [tasks, busy seconds]
    workers: set[tuple[str, int]] = field(default_factory=set)

    def add(self, done: Done) -> None:
        self.done += 1
        entry = self.per_node.setdefault(done.node, [0, 0.0])
        entry[0] += 1
        entry[1] += done.seconds
        self.workers.add((done.node, done.worker))

    def throughput(self) -> str:
        """``"2 workers on 1 node: 10.0.0.5 1.3 tasks/s"`` — tasks per wall-clock second per node."""
        wall = max(time.perf_counter() - self.started, 1e-9)
        nodes = ", ".join(f"{node} {n / wall:.2g} tasks/s" for node, (n, _) in sorted(self.per_node.items()))
        return f"{len(self.workers)} worker(s) on {len(self.per_node)} node(s): {nodes}"


def run_timed(fn: Callable[[Any], Any], item: Any) -> tuple[Any, str, int, float]:
    """Runs on the worker: ``fn(item)`` and where and how long it ran."""
    import os
    import socket

    started = time.perf_counter()
    value = fn(item)
    return value, socket.gethostname(), os.getpid(), time.perf_counter() - started
