"""Trajectories over a training run: every metric of every matrix over steps, and drift.

A run is a folder of checkpoints (Hugging Face ``checkpoint-<step>`` folders, nanoGPT-style
``*.pt`` files carrying ``iter_num``, or any folders/files with a number in their name) or an
explicit list, ordered by step. Each checkpoint goes through the ordinary analysis, so the store
makes a tensor seen before free and adding one checkpoint to a series costs one checkpoint's
work; drift is measured from the first checkpoint and from the previous one.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from .compare import DRIFT_COLUMNS, Model, target_row_name, drift_rows, match_tensors
from ..config import Config
from ..errors import LayerscopeError
from ..sources import PICKLE_SUFFIXES, open_source
from ..store import Store

_SKIP = ("optimizer", "scheduler", "rng_state", "training_args")


@dataclass
class Checkpoint:
    path: Path
    step: int | None
    label: str


def _number(name: str) -> int | None:
    found = re.findall(r"\d+", name)
    return int(found[-1]) if found else None


def _step_of(path: Path) -> int | None:
    """The training step of a checkpoint: trainer_state.json, then iter_num/step in a pickle, then the name."""
    state = path / "trainer_state.json"
    if state.is_file():
        try:
            return int(json.loads(state.read_text())["global_step"])
        except (ValueError, KeyError, TypeError, OverflowError, OSError):  # 1e999 -> inf (found by fuzzing)
            pass
    if path.is_file() and path.name.endswith(PICKLE_SUFFIXES):
        try:
            step = open_source(path).step  # the pickle's metadata (iter_num); tensors stay unread
            if step is not None:
                return step
        except LayerscopeError:
            pass  # reported when the checkpoint is analysed
    return _number(path.stem if path.is_file() else path.name)


def _is_checkpoint(path: Path) -> bool:
    if path.is_file():
        return path.name.endswith(PICKLE_SUFFIXES + (".safetensors",)) and not path.name.startswith(_SKIP)
    return path.is_dir() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin")) or any(path.glob("*.pt"))
                              or (path / "model.safetensors.index.json").exists())


def discover(paths: Sequence[str | os.PathLike]) -> list[Checkpoint]:
    """The checkpoints of a run, ordered by step. One folder is searched for checkpoints (sub-folders
    and files); several paths are taken as the checkpoints themselves."""
    paths = [Path(p).expanduser() for p in paths]
    for p in paths:
        if not p.exists():
            raise LayerscopeError(f"{p}: no such file or directory")
    if len(paths) == 1 and paths[0].is_dir():
        root = paths[0]
        found = sorted(c for c in root.iterdir() if _is_checkpoint(c) and _number(c.name) is not None)
        if not found:
            raise LayerscopeError(f"{root}: no checkpoints found (expected checkpoint-<step> folders or *.pt/*.safetensors "
                                  "files with a step in their name)")
        paths = found
    checkpoints = [Checkpoint(p, _step_of(p), p.stem if p.is_file() else p.name) for p in paths]
    if len(checkpoints) < 2:
        raise LayerscopeError("a trajectory needs at least two checkpoints")
    order = sorted(range(len(checkpoints)), key=lambda i: (checkpoints[i].step is None, checkpoints[i].step or 0, i))
    ordered = [checkpoints[i] for i in order]
    for i, c in enumerate(ordered):
        if c.step is None:
            c.step = i
    return ordered


@dataclass
class TrajectoryResult:
    """``table``: one row per (checkpoint, matrix) with every metric and the drift columns
    ``drift_first_*`` (from the first checkpoint) and ``drift_prev_*`` (from the previous one)."""

    checkpoints: list[Checkpoint]
    table: pd.DataFrame
    computed: int = 0
    cached: int = 0
    skipped: list[str] = field(default_factory=list)  # unreadable checkpoints, with the reason

    def save(self, path: str | os.PathLike) -> Path:
        from ..views import write_table

        return write_table(self.table, path)

    def over_steps(self, metric: str, role: str) -> pd.DataFrame:
        """``metric`` of matrices with ``role`` as a step × layer frame."""
        rows = self.table[(self.table["role"] == role) & self.table["layer"].notna()]
        return rows.pivot_table(index="step", columns="layer", values=metric, aggfunc="mean")

    def summary(self) -> pd.DataFrame:
        """Per checkpoint: global drift (all matrices as one vector) and the mean of the rank metrics."""
        out = []
        for step, rows in self.table.groupby("step", sort=True):
            mats = rows[rows["shape"].str.contains("×") & ~rows["name"].str.contains(r"\[") & ~rows["tied_copy"]]
            entry: dict[str, Any] = {"step": step, "checkpoint": rows["checkpoint"].iloc[0]}
            for ref in ("first", "prev"):
                col = f"drift_{ref}_rel_change"
                if col in mats and f"{ref}_norm" in mats:  # ‖θ − θ_ref‖ / ‖θ_ref‖ over all matrices
                    num = float(np.nansum((mats[col] * mats[f"{ref}_norm"]) ** 2))
                    den = float(np.nansum(mats[f"{ref}_norm"] ** 2))
                    entry[f"drift_from_{ref}"] = math.sqrt(num / den) if den > 0 and mats[col].notna().any() else math.nan
            for metric in ("entropy_rank", "stable_rank", "alpha"):
                if metric in mats:
                    entry[f"mean_{metric}"] = float(mats[metric].mean())
            out.append(entry)
        return pd.DataFrame(out)


def trajectory(paths: Sequence[str | os.PathLike], config: Config | None = None, *, procrustes: bool = False,
               progress: Callable[[str, int, int], None] | None = None, **overrides: Any) -> TrajectoryResult:
    """Analyse every checkpoint of a run and measure drift from the first and previous one.

    With ``config.cluster`` each checkpoint is one task on the cluster (see
    :mod:`layerscope.executor.tasks`); the rows are the same."""
    config = (config or Config()).replace(**overrides)
    checkpoints = discover(paths)
    skipped: list[str] = []
    pieces: list[tuple[Checkpoint, CheckpointPiece]] = []
    if config.cluster:
        from ..executor.tasks import trajectory_on_cluster

        readable = []
        for ckpt in checkpoints:
            try:
                readable.append((ckpt, Model.open(ckpt.path, label=ckpt.label)))
            except LayerscopeError as exc:  # one unreadable checkpoint must not cost the others
                skipped.append(f"{ckpt.label}: {exc}")
        pieces = list(zip([c for c, _ in readable], trajectory_on_cluster(readable, config, procrustes, progress)))
    else:
        first: Model | None = None
        prev: Model | None = None
        with Store(config.resolved_store()) as store:
            for i, ckpt in enumerate(checkpoints):
                try:
                    model = Model.open(ckpt.path, label=ckpt.label)
                except LayerscopeError as exc:  # one unreadable checkpoint must not cost the others
                    skipped.append(f"{ckpt.label}: {exc}")
                    continue
                cb = (lambda done, total, _n, _i=i, _c=ckpt: progress(f"{_c.label} ({_i + 1}/{len(checkpoints)})", done, total)) \
                    if progress else None
                pieces.append((ckpt, analyse_checkpoint(model, first, prev, store, config, procrustes, progress=cb)))
                first = first or model
                prev = model
    if len(pieces) < 2:
        raise LayerscopeError("a trajectory needs at least two readable checkpoints; unreadable: " + "; ".join(skipped))
    checkpoints = [c for c in checkpoints if not any(x.startswith(f"{c.label}: ") for x in skipped)]
    table = pd.concat(_frames(pieces), ignore_index=True)
    if not procrustes:
        table = table.drop(columns=[c for c in table if "procrustes" in c])
    computed = sum(p.computed for _, p in pieces)
    cached = sum(p.cached for _, p in pieces)
    return TrajectoryResult(checkpoints, table, computed, cached, skipped)


@dataclass
class CheckpointPiece:
    """What one checkpoint contributes, before it is placed in the series: its analysis table and
    its drift from the first and previous checkpoints (None for the first)."""

    table: pd.DataFrame
    tied: bool
    computed: int
    cached: int
    drifts: dict[str, pd.DataFrame | None]


def analyse_checkpoint(model: Model, first: Model | None, prev: Model | None, store: Store, config: Config,
                       procrustes: bool, progress: Callable[[int, int, str], None] | None = None,
                       manage_threads: bool = True) -> CheckpointPiece:
    """One checkpoint's share of a trajectory; needs nothing of the other checkpoints but their files."""
    from ..pipeline import analyze

    result = analyze(model.source, config, progress=progress, manage_threads=manage_threads)
    drifts = {name: _drift_from(ref, model, store, procrustes, config) if ref is not None else None
              for name, ref in (("first", first), ("prev", prev))}
    return CheckpointPiece(result.table, bool(result.anatomy.tied_embeddings), result.computed, result.cached, drifts)


def _frames(pieces: list[tuple[Checkpoint, CheckpointPiece]]) -> list[pd.DataFrame]:
    """The pieces in order, with step, checkpoint, drift columns and the references' norms."""
    frames = []
    norms: dict[str, pd.Series | None] = {"first": None, "prev": None}
    for ckpt, piece in pieces:
        table = piece.table.copy()
        table.insert(0, "step", ckpt.step)
        table.insert(1, "checkpoint", ckpt.label)
        # a head tied to the embedding is the same matrix: counted once in global figures
        table["tied_copy"] = (table["role"] == "lm_head") & piece.tied
        for ref_name in ("first", "prev"):
            drift = piece.drifts[ref_name]
            for col in DRIFT_COLUMNS:
                table[f"drift_{ref_name}_{col}"] = table["name"].map(drift[col]) if drift is not None else math.nan
            if drift is not None:
                ref_norms = norms[ref_name]
                ref_norm = drift["ref_row"].map(ref_norms) if ref_norms is not None and len(ref_norms) \
                    else pd.Series(math.nan, index=drift.index)
                table[f"{ref_name}_norm"] = table["name"].map(ref_norm)
            else:
                table[f"{ref_name}_norm"] = math.nan
        frames.append(table)
        own = piece.table.set_index("name")["frobenius_norm"] if "frobenius_norm" in piece.table else pd.Series(dtype=float)
        if norms["first"] is None:
            norms["first"] = own
        norms["prev"] = own
    return frames


def _drift_from(ref_model: Model, model: Model, store: Store, procrustes: bool,
                config: Config) -> pd.DataFrame | None:
    """Drift of ``model``'s matrices from ``ref_model``'s, indexed by ``model``'s row names, with
    the reference's row name in ``ref_row`` (whose Frobenius norm weighs the per-matrix drifts
    into a global one)."""
    pairs, _ = match_tensors(ref_model.anatomy, model.anatomy)
    rows = drift_rows(ref_model, model, pairs, store, procrustes=procrustes, slices=config.slices,
                      use_cache=config.cache)
    if not rows:
        return None
    drift = pd.DataFrame(rows)
    drift["ref_row"] = drift["name"]
    to_model = dict(pairs)
    drift["name"] = [target_row_name(n, to_model) for n in drift["name"]]
    return drift.set_index("name")
