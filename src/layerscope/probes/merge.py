"""Merging fine-tunes of one base: Fisher-weighted averaging, plain averaging and TIES.

* ``fisher`` (Matena & Raffel, 2022): θ* = Σ_t F̃_t θ_t / Σ_t F̃_t, entry by entry, with F_t the
  diagonal Fisher of model t on its own data (its kind as chosen, empirical by default) and
  F̃_t = max(F_t, ε), ε = ``FLOOR`` × the mean Fisher entry over all models and parameters. The floor
  is relative, so it does not depend on the loss's scale, and one ε for all models keeps an entry
  that no model's data touches (F = 0 everywhere, e.g. the embedding row of a token absent from
  every dataset) at the plain average instead of 0/0.
* ``average``: θ* = mean_t θ_t.
* ``ties`` (Yadav et al., 2023), needs the base: task vectors τ_t = θ_t − θ_base; *trim* each to its
  ``keep`` largest-magnitude entries per tensor (the same trim ``compare`` uses for its sign
  conflicts: ``change.drift.magnitude_threshold``); *elect* the sign of Σ_t τ̂_t per entry; *disjoint
  mean*: average only the τ̂_t that are nonzero and agree with the elected sign; θ* = θ_base + τ*.

The merged checkpoint is written with ``save_pretrained`` (``model.safetensors`` + config.json) and
the first input's tokenizer files are copied beside it. A nanoGPT ``ckpt.pt`` input is written in
the mapped GPT-2 (transformers) format — the model layerscope runs — so the merge loads with
``transformers.GPT2LMHeadModel.from_pretrained`` and needs no nanoGPT code (nanoGPT's absent biases
are written as zeros).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch

from ..change.drift import magnitude_threshold
from ..errors import LayerscopeError
from .model import RunnableModel, check_same_parameters

FLOOR = 1e-6
MERGE_METHODS = ("fisher", "average", "ties")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "spiece.model")

State = dict[str, torch.Tensor]


def average(states: Sequence[Mapping[str, torch.Tensor]]) -> State:
    return {n: (sum(s[n].double() for s in states) / len(states)).to(states[0][n].dtype) for n in states[0]}


def fisher_merge(states: Sequence[Mapping[str, torch.Tensor]], fishers: Sequence[Mapping[str, torch.Tensor]],
                 floor: float = FLOOR) -> State:
    """Σ F̃_t θ_t / Σ F̃_t per entry (see the module docstring for F̃)."""
    total = sum(float(v.double().sum()) for f in fishers for v in f.values())
    count = sum(v.numel() for f in fishers for v in f.values())
    eps = floor * total / count if count and total > 0 else floor
    out = {}
    for n in states[0]:
        num = torch.zeros(states[0][n].shape, dtype=torch.float64)
        den = torch.zeros_like(num)
        for s, f in zip(states, fishers):
            w = f[n].to("cpu", torch.float64).clamp(min=eps)
            num += w * s[n].to("cpu", torch.float64)
            den += w
        out[n] = (num / den).to(states[0][n].dtype)
    return out


def ties_merge(states: Sequence[Mapping[str, torch.Tensor]], base: Mapping[str, torch.Tensor], keep: float = 0.2,
               scale: float = 1.0) -> State:
    """Trim, elect sign, disjoint mean (see the module docstring)."""
    if not 0 < keep <= 1:
        raise LayerscopeError(f"--trim must lie in (0, 1], got {keep}")
    out = {}
    for n in states[0]:
        b = base[n].to("cpu", torch.float64)
        taus = []
        for s in states:
            tau = s[n].to("cpu", torch.float64) - b
            thr = magnitude_threshold(tau, keep)
            taus.append(torch.where(tau.abs() >= thr, tau, torch.zeros_like(tau)))
        stack = torch.stack(taus)
        elected = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == elected) & (stack != 0)
        count = agree.sum(0).clamp(min=1)
        merged = (stack * agree).sum(0) / count
        out[n] = (b + scale * merged).to(states[0][n].dtype)
    return out


def state_of(model: RunnableModel) -> State:
    return {n: p.detach().to("cpu").clone() for n, p in model.params.items()}


class Loaded:
    """Put ``state`` into ``model``'s parameters inside the ``with`` block (restored after)."""

    def __init__(self, model: RunnableModel, state: Mapping[str, torch.Tensor]):
        self.model, self.state, self.saved = model, state, {}

    def __enter__(self) -> RunnableModel:
        with torch.no_grad():
            for n, v in self.state.items():
                p = self.model.params[n]
                self.saved[n] = p.detach().clone()
                p.copy_(v.to(p.device, p.dtype))
        return self.model

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for n, v in self.saved.items():
                self.model.params[n].copy_(v)


def write_checkpoint(model: RunnableModel, state: Mapping[str, torch.Tensor], out: str | Path) -> Path:
    """``state`` saved through ``model``'s module with ``save_pretrained``, tokenizer files copied."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with Loaded(model, state):
        model.module.save_pretrained(out)
    if model.tokenizer_dir is not None:
        for f in TOKENIZER_FILES:
            src = Path(model.tokenizer_dir) / f
            if src.is_file():
                shutil.copy(src, out / f)
    return out


@dataclass
class MergeResult:
    """losses: one row per model (inputs, base, each merge), one column per dataset."""

    losses: pd.DataFrame
    written: Path | None
    method: str
    floor: float = FLOOR
    keep: float = 0.2
    fisher_kind: str = "empirical"
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "written": str(self.written) if self.written else None, "floor": self.floor,
                "keep": self.keep, "fisher_kind": self.fisher_kind, "notes": self.notes,
                "losses": self.losses.reset_index().to_dict(orient="records")}


def merge(paths: Sequence[Any], *, base: Any = None, data: Sequence[Any] | None = None, out: str | Path | None = None,
          method: str = "fisher", fisher_kind: str = "empirical", samples: int = 1, keep: float = 0.2, floor: float = FLOOR,
          seq_len: int | None = None, batches: int = 4, batch_size: int = 8, seed: int = 0, text_field: str | None = None,
          device: str | None = "cpu", dtype: str | None = None, store: Any = None, cache: bool = True,
          progress: Callable[[str, int, int], None] | None = None) -> MergeResult:
    """Merge the checkpoints ``paths`` and write the ``method`` merge to ``out``.

    ``data``: no dataset (the default text for every model), one (for every model), or one per
    model (each model's Fisher on its own data; every merge is evaluated on each)."""
    from . import load_data, load_model, probe_key
    from .fisher import FisherOptions, fisher_diagonal
    from .objective import Objective

    if len(paths) < 2:
        raise LayerscopeError("merge needs at least two checkpoints")
    if method not in MERGE_METHODS:
        raise LayerscopeError(f"--method: expected one of {', '.join(MERGE_METHODS)}, got {method!r}")
    if method == "ties" and base is None:
        raise LayerscopeError("--method ties needs --base (TIES merges task vectors θ − θ_base)")
    data = list(data or [])
    if len(data) not in (0, 1, len(paths)):
        raise LayerscopeError(f"--data: give none, one, or one per model ({len(paths)}), got {len(data)}")
    models = [load_model(p, device=device, dtype=dtype, store=store) for p in paths]
    base_model = load_model(base, device=device, dtype=dtype, store=store) if base is not None else None
    check_same_parameters(models + ([base_model] if base_model else []), "cannot merge")
    for m in models:
        m.require_lm_head("merging")
    kwargs = dict(text_field=text_field, seq_len=seq_len, batches=batches, batch_size=batch_size, seed=seed)
    sets = [load_data(models[0], d, **kwargs) for d in (data or [None])]
    labels = _unique([_label(d, i) for i, d in enumerate(data or [None])])
    per_model = sets if len(sets) == len(models) else [sets[0]] * len(models)

    states = [state_of(m) for m in models]
    candidates: dict[str, State] = {}
    options = FisherOptions(kind=fisher_kind, samples=samples, top_k=0, seed=seed)
    fishers = [fisher_diagonal(Objective(m, d), options, store=store, key=probe_key(m, d), cache=cache, progress=progress).values
               for m, d in zip(models, per_model)]
    candidates["fisher merge"] = fisher_merge(states, fishers, floor)
    candidates["average"] = average(states)
    notes = []
    if base_model is not None:
        candidates["TIES"] = ties_merge(states, state_of(base_model), keep)
    else:
        notes.append("TIES skipped: it needs --base")

    rows: dict[str, dict[str, float]] = {}
    model_labels = _unique([m.label for m in models])
    entries = [(lb, st) for lb, st in zip(model_labels, states)]
    if base_model is not None:
        entries.append((f"base ({base_model.label})", state_of(base_model)))
    entries += list(candidates.items())
    done = 0
    for name, st in entries:
        rows[name] = {}
        with Loaded(models[0], st) as m:
            for lb, d in zip(labels, sets):
                rows[name][lb] = Objective(m, d).evaluate().loss
                done += 1
                if progress:
                    progress("merge: evaluations", done, len(entries) * len(sets))
    written = None
    if out is not None:
        chosen = {"fisher": "fisher merge", "average": "average", "ties": "TIES"}[method]
        written = write_checkpoint(models[0], candidates[chosen], out)
        reloaded = load_model(written, device=device, dtype=dtype)  # the written file loads and runs
        name = f"written ({written.name})"
        rows[name] = {lb: Objective(reloaded, load_data(reloaded, d, **kwargs)).evaluate().loss
                      for lb, d in zip(labels, data or [None])}
    losses = pd.DataFrame.from_dict(rows, orient="index")
    losses.index.name = "model"
    return MergeResult(losses, written, method, floor, keep, fisher_kind, notes)


def _label(d: Any, i: int) -> str:
    if d is None:
        return "default text"
    return Path(str(d)).name or f"data {i + 1}"


def _unique(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for lb in labels:
        seen[lb] = seen.get(lb, 0) + 1
        out.append(lb if seen[lb] == 1 else f"{lb} ({seen[lb]})")
    return out
