"""Plan and executor: which metric runs on which matrix, and where.

Tensors are analysed by a thread pool (largest first, so the long ones do not finish last), each
worker holding one tensor at a time: memory is bounded by the tensors in flight, never by the
model. Torch's intra-op threads are divided among the workers — LAPACK's ``eigvalsh`` scales
poorly with threads, so two single-threaded workers beat one two-threaded one on a 2-core CPU.
Results go to the store as soon as each tensor is done.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch

from .anatomy import Anatomy, Part, build_anatomy, shape_text
from .config import Config
from .errors import LayerscopeError
from .weights.metrics import Metric, moments, select_metrics
from .sources import Source, open_source
from .weights.spectrum import Spectrum, singular_values, spectrum_record, stored_spectrum
from .store import Store

IDENTITY_COLUMNS = ["name", "layer", "role", "shape", "dtype", "numel"]
ERROR_KEY = ("error", "")

ProgressCallback = Callable[[int, int, str], None]


@dataclass
class AnalysisResult:
    """What ``analyze`` returns: the table (one row per matrix) and what it was computed from."""

    table: pd.DataFrame
    anatomy: Anatomy
    source: Source
    config: Config
    unreadable: list[str] = field(default_factory=list)
    computed: int = 0
    cached: int = 0
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.unreadable else 0

    def save(self, path: str | os.PathLike) -> Path:
        from .views import write_table

        return write_table(self.table, path)


def inspect(source: Any, revision: str | None = None) -> Anatomy:
    """The anatomy of a checkpoint (roles, layers, dims) without reading any tensor data."""
    src = open_source(source, revision)
    return build_anatomy(src.infos, src.config)


def analyze(source: Any, config: Config | None = None, *, revision: str | None = None,
            progress: ProgressCallback | None = None, manage_threads: bool = True, **overrides: Any) -> AnalysisResult:
    """Analyse every tensor of ``source``; see :class:`Config` for what ``overrides`` may set.

    ``manage_threads=False`` leaves torch's and BLAS's thread counts alone (they are process-wide):
    the training monitor analyses beside a training loop whose settings are not ours to change."""
    config = (config or Config()).replace(**overrides)
    metrics = select_metrics(config)
    src = open_source(source, revision)
    anatomy = build_anatomy(src.infos, src.config)
    started = time.perf_counter()
    with Store(config.resolved_store()) as store:
        runner = _Runner(src, anatomy, config, metrics, store)
        if config.cluster:  # tensors spread over a cluster; this process stays the store's one writer
            from .executor.tasks import analyze_on_cluster

            rows_by_name = analyze_on_cluster(runner, progress)
        else:
            rows_by_name = runner.run(progress, manage_threads)
    rows = [row for name in src.names() for row in rows_by_name.get(name, [])]
    table = _table(rows, metrics)
    _resolve_tied(anatomy, runner.hashes)
    return AnalysisResult(table, anatomy, src, config, runner.unreadable, runner.computed, runner.cached,
                          time.perf_counter() - started)


# -- execution ----------------------------------------------------------------------------------
class _Runner:
    def __init__(self, source: Source, anatomy: Anatomy, config: Config, metrics: list[Metric], store: Store):
        self.source, self.anatomy, self.config, self.metrics, self.store = source, anatomy, config, metrics, store
        self.keys = [(m.name, m.key) for m in metrics] + [ERROR_KEY]
        self.unreadable: list[str] = []
        self.hashes: dict[str, str] = {}
        self.computed = 0
        self.cached = 0
        self._count_lock = threading.Lock()
        self._threads = torch.get_num_threads()  # what each worker thread sets for itself

    def run(self, progress: ProgressCallback | None, manage_threads: bool = True) -> dict[str, list[dict[str, Any]]]:
        names = sorted(self.source.names(), key=lambda n: -self.source.infos[n].numel)
        workers = min(self.config.resolved_workers(), max(1, len(names)))
        results: dict[str, list[dict[str, Any]]] = {}
        total = len(names)
        queue = iter(names)
        with _torch_threads(workers) if manage_threads else nullcontext():
            # torch's intra-op thread count is per thread: every pool thread sets its own, through
            # the initializer the monitor's worker uses too. Managed: the cores divided among the
            # workers; unmanaged: the caller's (the training monitor runs its analysis single-threaded)
            self._threads = torch.get_num_threads()
            pool = ThreadPoolExecutor(workers, thread_name_prefix="layerscope", initializer=set_worker_threads,
                                      initargs=(self._threads,))
            pending: dict[Future, str] = {}
            try:
                # never more tensors in flight than workers: memory stays bounded by the largest ones
                for name in itertools.islice(queue, workers):
                    pending[pool.submit(self.analyse_tensor, name)] = name
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        name = pending.pop(fut)
                        results[name] = fut.result()
                        if progress:
                            progress(len(results), total, name)
                        nxt = next(queue, None)
                        if nxt is not None:
                            pending[pool.submit(self.analyse_tensor, nxt)] = nxt
                        elif len(pending) == 1 and workers > 1 and manage_threads:
                            # the last tensor in flight gets the idle workers' cores (its worker
                            # raises its own torch count before its decomposition)
                            self._threads = _use_all_cores()
            finally:
                # on Ctrl-C do not wait for decompositions in flight; finished tensors are already stored
                pool.shutdown(wait=not pending, cancel_futures=True)
        return results

    def analyse_tensor(self, name: str) -> list[dict[str, Any]]:
        entry = self.anatomy.entries[name]
        try:
            return self._analyse_parts(name)
        except LayerscopeError as exc:
            self.unreadable.append(name)
            return [self._row(name, Part("", entry.role, entry.expert), entry.shape, {ERROR_KEY: f"unreadable: {exc}"})]

    def _analyse_parts(self, name: str) -> list[dict[str, Any]]:
        tensor, digest = self._read(name)
        self.hashes[name] = digest
        rows = []
        for part in self.anatomy.parts(name, self.config.slices):
            part_hash = digest if not part.suffix else _derived_hash(digest, part.key)
            values = self.store.get(part_hash, self.keys) if self.config.cache else {}
            missing = [m for m in self.metrics if (m.name, m.key) not in values]
            recompute = bool(missing) or ERROR_KEY not in values
            if recompute:
                if tensor is None:
                    tensor, _ = self._read(name, force=True)
                new_values, spectrum = self._compute(part.apply(tensor), missing, part_hash)
                if " failed: " not in new_values[ERROR_KEY]:  # a failed computation is retried next run
                    self.store.put(part_hash, new_values, spectrum)
                values.update(new_values)
            with self._count_lock:
                if recompute:
                    self.computed += 1
                else:
                    self.cached += 1
            rows.append(self._row(name, part, _part_shape(self.anatomy, name, part), values))
        return rows

    def _read(self, name: str, force: bool = False) -> tuple[torch.Tensor | None, str]:
        return read_with_hash(self.source, self.store, name, self.config.cache, force)

    def _compute(self, matrix: torch.Tensor, missing: list[Metric], part_hash: str):
        values: dict[tuple[str, str], Any] = {}
        mom = moments(matrix)
        problem = spectrum_problem(matrix, mom)
        errors = [problem] if problem else []
        spec, record = None, None
        if not problem and matrix.dim() == 2 and any(m.needs == "spectrum" for m in missing):
            if torch.get_num_threads() != self._threads:
                set_worker_threads(self._threads)
            try:
                spec, record = self._spectrum(matrix, part_hash, missing)
            except Exception as exc:  # e.g. LAPACK not converging: this matrix loses its spectrum, no more
                errors.append(f"spectrum failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        for m in missing:
            intermediate = mom if m.needs == "moments" else spec
            if intermediate is None:
                values[(m.name, m.key)] = math.nan
                continue
            try:
                value = m(intermediate)
                values[(m.name, m.key)] = int(value) if isinstance(value, (int, np.integer)) else float(value)
            except Exception as exc:  # one failing metric must not cost the others
                values[(m.name, m.key)] = math.nan
                errors.append(f"{m.name} failed: {type(exc).__name__}: {exc}")
        values[ERROR_KEY] = "; ".join(errors)
        return values, record

    def _spectrum(self, matrix: torch.Tensor, part_hash: str,
                  missing: list[Metric]) -> tuple[Spectrum, tuple[str, np.ndarray] | None]:
        precision = self.config.dtype
        shape = (int(matrix.shape[0]), int(matrix.shape[1]))
        spectral = [m for m in missing if m.needs == "spectrum"]

        def certify(spec: Spectrum) -> bool:
            return all(m.certified(spec) for m in spectral)

        if self.config.cache:
            spec = stored_spectrum(self.store, part_hash, precision, shape)
            if spec is not None and certify(spec):
                return spec, None
        spec = singular_values(matrix, precision, self.config.device, certify=certify)
        return spec, spectrum_record(spec, precision)

    def _row(self, name: str, part: Part, shape: tuple[int, ...], values: dict[tuple[str, str], Any]) -> dict[str, Any]:
        entry = self.anatomy.entries[name]
        numel = int(np.prod(shape)) if shape else 1
        row: dict[str, Any] = {
            "name": f"{name}[{part.suffix}]" if part.suffix else name,
            "stack": entry.stack,
            "layer": entry.layer,
            "role": part.role,
            "expert": part.expert,
            "shape": shape_text(shape),
            "dtype": entry.dtype,
            "numel": numel,
        }
        for m in self.metrics:
            row[m.name] = values.get((m.name, m.key), math.nan)
        row["error"] = values.get(ERROR_KEY) or ""
        return row


def read_with_hash(source: Source, store: Store, name: str, use_cache: bool = True,
                   force: bool = False) -> tuple[torch.Tensor | None, str]:
    """The tensor and its content hash; the tensor is None when the store knows the hash from the
    file's fingerprint (and ``force`` is off), so unchanged tensors are not even read."""
    fingerprint = source.fingerprint(name)
    if not force and use_cache and fingerprint:
        known = store.hash_for(fingerprint)
        if known:
            return None, known
    try:
        tensor, digest = source.read(name)
    except LayerscopeError:
        raise
    except Exception as exc:  # any other failure to materialise this one tensor
        raise LayerscopeError(f"{name}: {type(exc).__name__}: {exc}") from None
    if fingerprint:
        store.remember_hash(fingerprint, digest)
    return tensor, digest


def spectrum_problem(matrix: torch.Tensor, mom) -> str | None:
    """Why this tensor has no spectrum, or None. 1-D tensors (biases, norms) are not a problem."""
    if matrix.dim() < 2:
        return None if matrix.numel() else "empty tensor"
    if matrix.numel() == 0:
        return f"empty tensor (shape {list(matrix.shape)})"
    if matrix.dim() > 2:
        return f"{matrix.dim()}-D tensor: spectral metrics need a matrix"
    if not matrix.dtype.is_floating_point:
        return f"{str(matrix.dtype).removeprefix('torch.')} tensor: spectral metrics need floating-point weights"
    if min(matrix.shape) == 1:
        return f"degenerate {matrix.shape[0]}×{matrix.shape[1]} matrix: spectral metrics need both dimensions > 1"
    if mom.nans or mom.infs:
        return f"contains {mom.nans} NaN and {mom.infs} Inf values: spectral metrics skipped"
    if mom.zeros == mom.numel:
        return "all-zero matrix: spectral metrics undefined"
    return None


def _derived_hash(digest: str, key: str) -> str:
    return hashlib.blake2b(f"{digest}|{key}".encode(), digest_size=16).hexdigest()


def _part_shape(anatomy: Anatomy, name: str, part: Part) -> tuple[int, ...]:
    if not part.suffix:
        return anatomy.entries[name].shape
    meta = torch.empty(anatomy.entries[name].shape, device="meta")
    return tuple(part.apply(meta).shape)


@contextmanager
def _torch_threads(workers: int) -> Iterator[None]:
    """Divide the cores among the workers, for torch (MKL/OpenMP) and NumPy's BLAS alike."""
    from threadpoolctl import threadpool_limits

    per_worker = max(1, (os.cpu_count() or 1) // workers)
    before = torch.get_num_threads()
    torch.set_num_threads(per_worker)
    try:
        with threadpool_limits(limits=per_worker, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


def set_worker_threads(count: int) -> None:
    """Torch's intra-op thread count for the calling thread (the pool's and the monitor's worker
    initializer): OpenMP/MKL keep it per thread, so a new thread does not inherit its creator's."""
    torch.set_num_threads(max(1, int(count)))


def _use_all_cores() -> int:
    """Raise the thread counts to every core; ``_torch_threads`` restores them when the run ends."""
    from threadpoolctl import threadpool_limits

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    threadpool_limits(limits=cores, user_api="blas")
    return cores


def _resolve_tied(anatomy: Anatomy, hashes: dict[str, str]) -> None:
    if anatomy.tied_embeddings is not None:
        return
    embed = next((hashes[e.name] for e in anatomy.by_role("embed.token") if e.name in hashes), None)
    head = next((hashes[e.name] for e in anatomy.by_role("lm_head") if e.name in hashes), None)
    if embed and head:
        anatomy.tied_embeddings = embed == head


def _table(rows: list[dict[str, Any]], metrics: list[Metric]) -> pd.DataFrame:
    columns = ["name", "stack", "layer", "role", "expert", "shape", "dtype", "numel"] + [m.name for m in metrics] + ["error"]
    table = pd.DataFrame(rows, columns=columns)
    if (table["stack"].fillna("") == "").all():
        table = table.drop(columns="stack")  # one stack: the table is as it always was
    table["layer"] = table["layer"].astype("Int64")
    table["expert"] = table["expert"].astype("Int64")
    if table["expert"].isna().all():
        table = table.drop(columns="expert")
    for m in metrics:
        col = pd.to_numeric(table[m.name], errors="coerce")
        table[m.name] = col.round().astype("Int64") if m.integer else col.astype(float)
    return table
