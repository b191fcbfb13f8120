"""layerscope's work cut into independent tasks for an executor: tensors of one checkpoint
(``analyze``) and whole checkpoints (``trajectory``), with the driver as the only store writer.

How a piece of work travels:

1. The driver asks its store first, by running the piece as a *dry run*: the ordinary code, on a
   :class:`StoreOnlySource` that knows every tensor's name, shape and file fingerprint but raises
   :class:`NeedsData` instead of reading bytes. A piece whose every result is stored completes
   from the store alone and is never submitted — a re-run submits nothing.
2. Otherwise it is submitted with a *seed*: the store rows about its tensors' known hashes, so the
   worker skips exactly what the driver's store would have let it skip.
3. The worker runs the ordinary code (the same ``_Runner``, ``analyze``, ``drift_rows``) against a
   private temporary store holding the seed, reading weights from a path every node can see (a
   shared file system, the hub cache) — or, for a live module or state dict, from tensors the
   driver put in the Ray object store — and returns its rows plus what its store learned.
4. The driver merges those records into its store (one transaction per task) and keeps the rows.

Same code on both sides, so the rows and store keys are those of a single-process run.
Memory per worker: one task holds one tensor at a time (analysis), or a tensor and its
reference's (drift), as on one machine.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..anatomy import Anatomy, build_anatomy
from ..config import Config
from ..sources import Source, open_source
from ..sources.module import StateDictSource
from ..store import Records, Store
from . import open_executor
from .base import ExecutorStats


class NeedsData(BaseException):
    """Raised by a dry run at the first tensor it would have to read. A BaseException, so that
    the per-tensor error handling (which turns a read failure into an 'unreadable' row) lets it by."""


class StoreOnlySource(Source):
    """``source`` without its bytes: names, shapes, config and fingerprints, and no tensor."""

    def __init__(self, source: Source):
        super().__init__(label=source.label, format=source.format, infos=source.infos, config=source.config,
                         directory=source.directory, step=source.step, revision=source.revision)
        self._inner = source

    def fingerprint(self, name: str) -> str | None:
        return self._inner.fingerprint(name)

    def load(self, name: str) -> torch.Tensor:
        raise NeedsData(name)

    def read(self, name: str) -> tuple[torch.Tensor, str]:
        raise NeedsData(name)


class _Unopenable(Source):
    """A source the worker could not open: every read fails with the reason, so each of its
    tensors becomes an 'unreadable' row, as a read failure does on one machine."""

    def __init__(self, anatomy: Anatomy, exc: Exception):
        from ..sources import TensorInfo

        super().__init__(label="", format="", infos={n: TensorInfo(n, e.shape, e.dtype) for n, e in anatomy.entries.items()})
        self._exc = exc

    def load(self, name: str) -> torch.Tensor:
        from ..errors import LayerscopeError

        raise LayerscopeError(f"{name}: {self._exc}")


# -- sources on workers -----------------------------------------------------------------------------
@dataclass
class SourceRef:
    """How a worker gets a source: re-opened from its path (or hub id), or — for a live module or
    state dict the driver holds — the tensors themselves (Ray carries them in its object store)."""

    label: str
    revision: str | None = None
    tensors: dict[str, torch.Tensor] | None = None
    format: str = ""
    config: dict[str, Any] | None = None
    step: int | None = None

    @classmethod
    def of(cls, source: Source, names: list[str] | None = None) -> "SourceRef":
        if isinstance(source, StateDictSource):
            names = list(source.infos) if names is None else names
            return cls(source.label, tensors={n: source.load(n) for n in names}, format=source.format,
                       config=source.config, step=source.step)
        return cls(source.label, source.revision)

    def open(self) -> Source:
        if self.tensors is not None:
            src = StateDictSource(self.tensors, self.label, self.config, self.step)
            src.format = self.format
            return src
        return _cached_open(self.label, self.revision)


_OPENED: "OrderedDict[tuple, Source]" = OrderedDict()


def _cached_open(label: str, revision: str | None) -> Source:
    """Per worker process, the last few sources opened (a legacy pickle is read whole when opened);
    keyed by the file's size and mtime too, so a rewritten checkpoint is opened afresh."""
    path = Path(label)
    stamp = (path.stat().st_size, path.stat().st_mtime_ns) if path.exists() else None
    key = (label, revision, stamp)
    if key not in _OPENED:
        _OPENED[key] = open_source(label, revision)
        while len(_OPENED) > 3:
            _OPENED.popitem(last=False)
    _OPENED.move_to_end(key)
    return _OPENED[key]


@contextmanager
def worker_store(seed: Records) -> Iterator[tuple[Store, Path]]:
    """A private store on the worker, holding ``seed``; removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="layerscope-task-"))
    try:
        with Store(folder / "task.sqlite") as store:
            store.merge(seed)
            yield store, folder / "task.sqlite"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def seed_for(store: Store, sources: list[tuple[Source, Anatomy, list[str] | None]], slices: bool,
             use_cache: bool = True) -> Records:
    """The driver's rows about the named tensors (all when None) of each source whose hash it
    knows from the file's fingerprint: results, spectra, drift between them, fingerprints."""
    from ..pipeline import _derived_hash

    if not use_cache:
        return {}
    hashes: set[str] = set()
    prints: list[str] = []
    for source, anatomy, names in sources:
        for name in (source.names() if names is None else names):
            fp = source.fingerprint(name)
            digest = store.hash_for(fp) if fp else None
            if digest is None:
                continue
            prints.append(fp)
            hashes.add(digest)
            hashes.update(_derived_hash(digest, p.key) for p in anatomy.parts(name, slices) if p.suffix)
    return store.records(hashes, prints)


def _local_config(config: Config, **changes: Any) -> Config:
    """``config`` for code that must run here (``Config.replace`` keeps a field given None)."""
    return dataclasses.replace(config, cluster=None, **changes)


def _report(progress: Callable[..., None] | None, *args: Any) -> None:
    if progress:
        progress(*args)


# -- analyze: tensors of one checkpoint ------------------------------------------------------------
@dataclass
class TensorJob:
    source: SourceRef
    anatomy: Anatomy
    config: Config
    names: list[str]
    seed: Records = field(default_factory=dict)


@dataclass
class TensorOutcome:
    rows: dict[str, list[dict[str, Any]]]
    unreadable: list[str]
    hashes: dict[str, str]
    computed: int
    cached: int
    records: Records


def analyse_tensors(job: TensorJob) -> TensorOutcome:
    """On a worker: the ordinary per-tensor analysis of ``job.names``, one tensor at a time."""
    from ..errors import LayerscopeError
    from ..pipeline import _Runner
    from ..weights.metrics import select_metrics

    try:
        source = job.source.open()
    except LayerscopeError as exc:  # e.g. the file changed since the driver opened it: rows say so
        source = _Unopenable(job.anatomy, exc)
    with worker_store(job.seed) as (store, _):
        runner = _Runner(source, job.anatomy, job.config, select_metrics(job.config), store)
        rows = {name: runner.analyse_tensor(name) for name in job.names}
        records = store.dump(exclude=job.seed)
    return TensorOutcome(rows, runner.unreadable, runner.hashes, runner.computed, runner.cached, records)


def group_by_size(names: list[str], numel: Callable[[str], int]) -> list[list[str]]:
    """Tensors largest first, packed into tasks of at most the largest tensor's size: big matrices
    go alone, biases and norms travel together (a task holds one tensor at a time either way)."""
    names = sorted(names, key=lambda n: -numel(n))
    if not names:
        return []
    cap = max(numel(names[0]), 1)
    groups: list[list[str]] = [[]]
    total = 0
    for n in names:
        if groups[-1] and total + numel(n) > cap:
            groups.append([])
            total = 0
        groups[-1].append(n)
        total += numel(n)
    return groups


def analyze_on_cluster(runner: Any, progress: Callable[[int, int, str], None] | None) -> dict[str, list[dict[str, Any]]]:
    """``_Runner.run`` with the tensors spread over ``runner.config.cluster``; fills the runner's
    counters, hashes and unreadable list as ``run`` would."""
    from ..pipeline import _Runner

    source, anatomy, config, store = runner.source, runner.anatomy, runner.config, runner.store
    names = source.names()
    results: dict[str, list[dict[str, Any]]] = {}
    todo = []
    if config.cache:  # 1. what the store already answers is not submitted
        dry = _Runner(StoreOnlySource(source), anatomy, config, runner.metrics, store)
        for name in names:
            before = dry.cached
            try:
                results[name] = dry.analyse_tensor(name)
            except NeedsData:
                dry.cached = before
                todo.append(name)
        runner.cached += dry.cached
        runner.hashes.update(dry.hashes)
    else:
        todo = list(names)
    total = len(names)
    _report(progress, len(results), total, "from the store")
    if not todo:
        return results
    executor = open_executor(config.cluster)
    job_config = _local_config(config)
    # a generator: a job's seed and (for in-memory weights) its tensors are gathered when it is submitted
    jobs = (TensorJob(SourceRef.of(source, group), anatomy, job_config, group,
                      seed_for(store, [(source, anatomy, group)], config.slices, config.cache))
            for group in group_by_size(todo, lambda n: source.infos[n].numel))
    stats = ExecutorStats()
    for done in executor.map(analyse_tensors, jobs):  # 2.-3. on the workers
        out: TensorOutcome = done.value
        store.merge(out.records)  # 4. the driver writes
        results.update(out.rows)
        runner.unreadable.extend(out.unreadable)
        runner.hashes.update(out.hashes)
        runner.computed += out.computed
        runner.cached += out.cached
        stats.add(done)
        _report(progress, len(results), total, stats.throughput())
    runner.cluster_stats = stats
    return results


# -- trajectory: whole checkpoints ---------------------------------------------------------------------
@dataclass
class CheckpointJob:
    index: int
    label: str
    model: SourceRef
    first: SourceRef | None
    prev: SourceRef | None
    config: Config
    procrustes: bool
    seed: Records = field(default_factory=dict)


def analyse_checkpoint(job: CheckpointJob) -> tuple[Any, Records]:
    """On a worker: one checkpoint's analysis and its drift from the first and previous ones."""
    from ..change.compare import Model
    from ..change.trajectory import analyse_checkpoint as piece_of

    def model(ref: SourceRef | None, label: str = "") -> Model | None:
        if ref is None:
            return None
        src = ref.open()
        return Model(src, build_anatomy(src.infos, src.config), label or ref.label)

    with worker_store(job.seed) as (store, path):
        config = _local_config(job.config, store=str(path), workers=1)
        piece = piece_of(model(job.model, job.label), model(job.first), model(job.prev), store, config, job.procrustes,
                         manage_threads=False)
        records = store.dump(exclude=job.seed)
    return piece, records


def trajectory_on_cluster(readable: list[tuple[Any, Any]], config: Config, procrustes: bool,
                          progress: Callable[..., None] | None) -> list[Any]:
    """The pieces of ``trajectory`` (one per readable checkpoint, in order) computed on the cluster."""
    from ..change.compare import Model
    from ..change.trajectory import analyse_checkpoint as piece_of

    def dry(model: Model | None) -> Model | None:
        return None if model is None else Model(StoreOnlySource(model.source), model.anatomy, model.label)

    local = _local_config(config)
    pieces: list[Any] = [None] * len(readable)
    jobs = []
    with Store(config.resolved_store()) as store:
        for i, (ckpt, model) in enumerate(readable):
            first = readable[0][1] if i else None
            prev = readable[i - 1][1] if i else None
            if config.cache:
                try:  # a checkpoint the store fully answers is not submitted
                    pieces[i] = piece_of(dry(model), dry(first), dry(prev), store, local, procrustes)
                    continue
                except NeedsData:
                    pass
            involved = [m for m in (model, first, prev) if m is not None]
            seed = seed_for(store, [(m.source, m.anatomy, None) for m in involved], config.slices, config.cache)
            jobs.append(CheckpointJob(i, ckpt.label, SourceRef.of(model.source), first and SourceRef.of(first.source),
                                      prev and SourceRef.of(prev.source), local, procrustes, seed))
        done_count = len(readable) - len(jobs)
        _progress_checkpoints(progress, done_count, len(readable), "from the store")
        if jobs:
            stats = ExecutorStats()
            for done in open_executor(config.cluster).map(analyse_checkpoint, jobs):
                piece, records = done.value
                store.merge(records)
                pieces[done.item.index] = piece
                stats.add(done)
                done_count += 1
                _progress_checkpoints(progress, done_count, len(readable), stats.throughput())
    return pieces


def _progress_checkpoints(progress: Callable[..., None] | None, done: int, total: int, text: str) -> None:
    """``progress(stage, done, total)``, plus the throughput text when the callback takes a fourth
    argument (views.ProgressDisplay.update shows it beside the bar)."""
    if progress is None:
        return
    import inspect

    try:
        params = inspect.signature(progress).parameters.values()
        takes_text = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 4 \
            or any(p.kind == p.VAR_POSITIONAL for p in params)
    except (TypeError, ValueError):
        takes_text = False
    if takes_text:
        progress("checkpoints", done, total, text)
    else:
        progress("checkpoints", done, total)
