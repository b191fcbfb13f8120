"""The Fisher information of the probe loss: its diagonal, its trace and top eigenvalues, per tensor,
layer, attention head and MLP neuron.

Which Fisher (``kind``):

* ``empirical`` — F = Σ_i w_i g_i g_iᵀ with g_i the gradient of example i's loss at its *data*
  targets. An example is one sequence (window) of the probe data and its loss the mean token
  cross-entropy over its targets; w_i its share of the probe loss (its target count / all targets,
  so Σ w_i = 1 and L = Σ w_i ℓ_i; 1/N for equal-length windows and for a custom module's examples).
* ``true`` — the Monte-Carlo Fisher of the model's own predictive distribution: the same sum with
  every target replaced by a draw from the model's softmax at that position, averaged over
  ``samples`` draws (seeded; E over draws = the true Fisher of the per-example loss). At a 50k
  vocabulary the exact expectation needs one backward per class, so it is sampled, as the design
  says.
* ``exact`` — the expectation over classes computed exactly (one vmapped gradient per class), for
  custom classifiers with a small output space (≤ ``MAX_EXACT_CLASSES`` classes).

Normalisation: F is per example and weighted by w_i (Σ w_i = 1), i.e. the scale of the mean loss's
curvature, not of a sum over examples. The diagonal is F's diagonal; the trace is its sum
(= Σ_i w_i ‖g_i‖²).

Eigenvalues (empirical Fisher only): F = AᵀA with rows √w_i g_i, whose nonzero eigenvalues are
exactly those of the N×N Gram matrix K = AAᵀ (K_ij = √(w_i w_j) g_i·g_j). K is formed in float64
from blocks of per-example gradients held within ``gram_memory`` bytes (more blocks mean more
passes: k blocks cost k(k+1)/2 block computations) and diagonalised with ``eigvalsh``: exact for
the N examples of the probe data, no iteration, no stopping rule. It is the empirical Fisher of N
examples, so it has rank ≤ N.

Results are stored under (weights hash : data hash, part, options); the diagonal's running sum is
saved at most every ``SAVE_EVERY`` seconds while it runs, so Ctrl-C loses little and a re-run
resumes at the next batch.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import LayerscopeError
from . import aggregate
from .data import ProbeData
from .model import RunnableModel
from .objective import Objective
from .per_example import DEFAULT_MEMORY, PerExampleGradients, flat, is_categorical

FISHER_KINDS = ("empirical", "true", "exact")
MAX_EXACT_CLASSES = 64
SAVE_EVERY = 30.0  # seconds between saves of the running sum
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class FisherOptions:
    """kind: empirical / true / exact (see the module docstring); samples: Monte-Carlo draws per
    example (true); top_k: eigenvalues of the empirical Fisher to report (0: none); memory: bytes
    for one chunk of per-example gradients; gram_memory: bytes of per-example gradients held to form
    the Gram matrix; seed: the draws' seed."""

    kind: str = "empirical"
    samples: int = 1
    top_k: int = 10
    memory: int = DEFAULT_MEMORY
    gram_memory: int = 1 << 30
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FISHER_KINDS:
            raise LayerscopeError(f"--fisher-kind: expected one of {', '.join(FISHER_KINDS)}, got {self.kind!r}")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise LayerscopeError(f"--fisher-samples must be a positive integer, got {self.samples!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise LayerscopeError(f"--fisher-top-k must be a non-negative integer, got {self.top_k!r}")
        if self.memory < 1 << 10 or self.gram_memory < 1 << 10:
            raise LayerscopeError("Fisher memory budgets must be at least 1KB")

    def diag_tag(self) -> str:
        keys = {"kind": self.kind}
        if self.kind == "true":
            keys.update(samples=self.samples, seed=self.seed)
        return json.dumps(keys, sort_keys=True)


@dataclass
class Diagonal:
    """The diagonal Fisher, one tensor per parameter (float32, CPU, shaped like the parameter)."""

    values: dict[str, torch.Tensor]
    kind: str
    examples: int
    rows: int | None = None  # examples per vmapped chunk actually used (None: read from the store)
    seconds: float = 0.0

    @property
    def trace(self) -> float:
        return float(sum(v.double().sum() for v in self.values.values()))


@dataclass
class GramSpectrum:
    """Eigenvalues of the empirical Fisher (all N nonzero candidates, descending) and its trace."""

    eigenvalues: np.ndarray
    trace: float
    examples: int
    blocks: int

    def top(self, k: int) -> np.ndarray:
        return self.eigenvalues[:k]

    def to_dict(self, k: int | None = None) -> dict[str, Any]:
        ev = self.eigenvalues if k is None else self.eigenvalues[:k]
        return {"eigenvalues": [float(v) for v in ev], "trace": self.trace, "examples": self.examples, "blocks": self.blocks}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GramSpectrum":
        return cls(np.asarray(d["eigenvalues"], dtype=np.float64), d["trace"], d["examples"], d["blocks"])


def _names(model: RunnableModel, names: Sequence[str] | None) -> list[str]:
    names = list(names) if names is not None else list(model.params)
    unknown = [n for n in names if n not in model.params]
    if unknown:
        raise LayerscopeError(f"not a probe parameter: {unknown[0]}")
    return names


def _dtype_tag(model: RunnableModel) -> str:
    return str(model.dtype).removeprefix("torch.")


# -- the diagonal --------------------------------------------------------------------------------
def fisher_diagonal(objective: Objective, options: FisherOptions | None = None, *, names: Sequence[str] | None = None,
                    store: Any = None, key: str | None = None, cache: bool = True,
                    progress: Progress | None = None) -> Diagonal:
    """The diagonal Fisher of ``options.kind`` over every batch of ``objective`` (see module docstring)."""
    options = options or FisherOptions()
    model = objective.model
    names = _names(model, names)
    if options.kind in ("true", "exact") and not is_categorical(objective):
        raise LayerscopeError(f"the {options.kind} Fisher needs a categorical output (a language model, or a module "
                              "whose loss_fn is cross-entropy); use --fisher-kind empirical")
    kind_tag = f"fisher.diag:{_dtype_tag(model)}:{options.diag_tag()}:{','.join(names) if names != list(model.params) else 'all'}"
    use_store = store is not None and key is not None
    if use_store and cache:
        stored = store.arrays(key, kind_tag)
        if stored and "__examples__" in stored:
            examples = int(stored.pop("__examples__")[0])
            return Diagonal({n: torch.from_numpy(stored[n]) for n in names}, options.kind, examples)
    started = time.perf_counter()
    peg = PerExampleGradients(objective, names, memory=options.memory)
    nb = objective.n_batches
    draws = options.samples if options.kind == "true" else 1
    # draws that share one vmapped pass: as many as fit in a chunk beside a whole batch (results do
    # not depend on the grouping: every draw has its own seeded uniforms)
    batch_len = max(int(objective.example_weights(b).numel()) for b in range(nb))
    group = max(1, min(draws, peg.rows // batch_len))
    groups = [list(range(s, min(draws, s + group))) for s in range(0, draws, group)]
    units = len(groups) * nb
    out_dtype = torch.float64 if model.dtype == torch.float64 else torch.float32
    acc = {n: torch.zeros(model.params[n].shape, dtype=torch.float64, device=model.device) for n in names}
    done = 0
    partial_tag = kind_tag + f":partial:{group}"
    if use_store and cache:
        partial = store.arrays(key, partial_tag)
        if partial and "__done__" in partial:
            done = int(partial.pop("__done__")[0])
            for n in names:
                acc[n] = torch.from_numpy(partial[n]).to(model.device)
    total_examples = sum(int(objective.example_weights(b).numel()) for b in range(nb))
    last_save = time.perf_counter()

    def report(unit: int) -> None:
        if progress:
            progress("Fisher: examples", unit * total_examples * group // nb, units * total_examples * group // nb)

    report(done)
    for unit in range(done, units):
        g_i, b = divmod(unit, nb)
        if options.kind == "exact":
            _exact_batch(peg, objective, b, acc)
        else:
            labels = "sample" if options.kind == "true" else "data"
            for w, grads in peg.batch(b, labels=labels, seed=options.seed, samples=groups[g_i]):
                w = w.to(model.device)
                for n in names:
                    g = grads[n]
                    acc[n] += torch.tensordot(w.to(g.dtype), g * g, dims=1).double()
        report(unit + 1)
        if use_store and unit + 1 < units and time.perf_counter() - last_save > SAVE_EVERY:
            _save_partial(store, key, partial_tag, acc, unit + 1)
            last_save = time.perf_counter()
    values = {n: (acc[n] / draws).to("cpu", out_dtype) for n in names}
    result = Diagonal(values, options.kind, total_examples, peg.used_rows, time.perf_counter() - started)
    if use_store:
        store.put_arrays(key, kind_tag, {**{n: v.numpy() for n, v in values.items()},
                                         "__examples__": np.array([total_examples], dtype=np.int64)})
    return result


def _save_partial(store: Any, key: str, tag: str, acc: dict[str, torch.Tensor], done: int) -> None:
    store.put_arrays(key, tag, {**{n: a.cpu().numpy() for n, a in acc.items()}, "__done__": np.array([done], dtype=np.int64)})


def _exact_batch(peg: PerExampleGradients, objective: Objective, b: int, acc: dict[str, torch.Tensor]) -> None:
    """Σ_i w_i Σ_c p_ic g_ic² for one batch: one vmapped gradient per class (small output spaces)."""
    model = objective.model
    x, y = objective.data.batch(b)
    if objective.token_loss is not None:
        raise LayerscopeError("the exact Fisher needs one backward per vocabulary entry and position; "
                              "use --fisher-kind true (Monte-Carlo)")
    with torch.no_grad():
        probs = torch.softmax(model.module(objective._to_device(x)).double(), dim=-1)
    n_classes = probs.shape[-1]
    if probs.dim() != 2 or n_classes > MAX_EXACT_CLASSES:
        raise LayerscopeError(f"the exact Fisher is for classifiers with at most {MAX_EXACT_CLASSES} classes; "
                              "use --fisher-kind true (Monte-Carlo)")
    start = 0
    for c in range(n_classes):
        fixed = torch.full_like(y, c)
        start = 0
        for w, grads in peg.batch(b, fixed_labels=fixed):
            n = w.numel()
            pw = (w.to(probs.device) * probs[start:start + n, c]).to(model.device)
            start += n
            for name, g in grads.items():
                acc[name] += torch.tensordot(pw.to(g.dtype), g * g, dims=1).double()


# -- the spectrum (empirical Fisher, from the Gram matrix) ----------------------------------------
def gram_spectrum(objective: Objective, options: FisherOptions | None = None, *, names: Sequence[str] | None = None,
                  store: Any = None, key: str | None = None, cache: bool = True,
                  progress: Progress | None = None) -> GramSpectrum:
    """All eigenvalues of the empirical Fisher's N×N Gram matrix (see the module docstring)."""
    options = options or FisherOptions()
    model = objective.model
    names = _names(model, names)
    tag = json.dumps({"dtype": _dtype_tag(model),
                      "names": "all" if names == list(model.params) else names}, sort_keys=True)
    if store is not None and key is not None and cache:
        stored = store.artifact(key, "fisher.gram", tag)
        if stored is not None:
            return GramSpectrum.from_dict(stored)
    peg = PerExampleGradients(objective, names, memory=options.memory)
    p = sum(model.params[n].numel() for n in names)
    nb = objective.n_batches
    sizes = [int(objective.example_weights(b).numel()) for b in range(nb)]
    n_total = sum(sizes)
    per_row = p * (8 if model.dtype == torch.float64 else 4)
    blocks: list[list[int]] = [[]]
    for b in range(nb):
        if blocks[-1] and (sum(sizes[x] for x in blocks[-1]) + sizes[b]) * per_row > options.gram_memory:
            blocks.append([])
        blocks[-1].append(b)
    offsets = np.cumsum([0] + [sum(sizes[x] for x in blk) for blk in blocks])
    work = sum(sum(sizes[x] for x in blocks[j]) for i in range(len(blocks)) for j in range(i, len(blocks)))
    done = 0

    def rows(blk: list[int]) -> torch.Tensor:
        nonlocal done
        out = []
        for b in blk:
            for w, grads in peg.batch(b):
                a = flat(grads, names)
                out.append(a * w.to(a.device, a.dtype).sqrt()[:, None])
                done += w.numel()
                if progress:
                    progress("Fisher Gram: examples", done, work)
        return torch.cat(out)

    gram = np.zeros((n_total, n_total))
    for i, bi in enumerate(blocks):
        ai = rows(bi)
        si = slice(offsets[i], offsets[i + 1])
        gram[si, si] = _cross(ai, ai)
        for j in range(i + 1, len(blocks)):
            aj = rows(blocks[j])
            sj = slice(offsets[j], offsets[j + 1])
            gram[si, sj] = _cross(ai, aj)
            gram[sj, si] = gram[si, sj].T
            del aj
        del ai
    ev = np.linalg.eigvalsh(gram)[::-1].clip(min=0.0)  # K is PSD: negative values are rounding
    result = GramSpectrum(ev.copy(), float(np.trace(gram)), n_total, len(blocks))
    if store is not None and key is not None:
        store.put_artifact(key, "fisher.gram", tag, result.to_dict())
    return result


def _cross(a: torch.Tensor, b: torch.Tensor, cols: int = 1 << 20) -> np.ndarray:
    """A Bᵀ in float64, over column chunks (bounds the float64 copies)."""
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for s in range(0, a.shape[1], cols):
        out += a[:, s:s + cols].double() @ b[:, s:s + cols].double().T
    return out.cpu().numpy()


# -- overlap between two Fishers ------------------------------------------------------------------
def overlap(f1: torch.Tensor, f2: torch.Tensor, top: float = 0.01) -> dict[str, float]:
    """``overlap`` = 1 − ½‖√F̂₁ − √F̂₂‖² with F̂ = F / tr F (1: the same shape of importance, 0:
    disjoint supports); ``top_shared``: the share of F₁'s top-``top`` entries (largest values, at
    least one) that are also among F₂'s — the same count both ways, so one number."""
    a, b = f1.reshape(-1).double().clamp(min=0), f2.reshape(-1).double().clamp(min=0)
    ta, tb = float(a.sum()), float(b.sum())
    if ta <= 0 or tb <= 0:
        return {"overlap": math.nan, "top_shared": math.nan, "numel": a.numel()}
    value = 1.0 - 0.5 * float(((a / ta).sqrt() - (b / tb).sqrt()).pow(2).sum())
    k = max(1, int(math.ceil(top * a.numel())))
    ia = torch.topk(a, k).indices
    ib = torch.topk(b, k).indices
    shared = np.intersect1d(ia.numpy(), ib.numpy()).size / k
    return {"overlap": value, "top_shared": shared, "numel": a.numel()}


def overlap_tables(model: RunnableModel, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                   top: float = 0.01) -> dict[str, pd.DataFrame]:
    """Fisher overlap of two diagonals for the whole model and per tensor, layer and head (a head's
    entries: its q rows, o columns, and its key/value head's k and v rows)."""
    names = [n for n in a if n in b]
    cat = lambda d, ns: torch.cat([d[n].reshape(-1) for n in ns])  # noqa: E731
    model_row = {"scope": "model", **overlap(cat(a, names), cat(b, names), top)}
    tensors = pd.DataFrame([{"name": n, "role": model.role(n), "layer": model.layer(n), **overlap(a[n], b[n], top)}
                            for n in names])
    by_layer: dict[Any, list[str]] = {}
    for n in names:
        by_layer.setdefault(model.layer(n) if model.layer(n) is not None else aggregate.OUTSIDE, []).append(n)
    order = sorted(by_layer, key=lambda k: (1, 0) if k == aggregate.OUTSIDE else (0, k))
    layers = pd.DataFrame([{"layer": k, **overlap(cat(a, by_layer[k]), cat(b, by_layer[k]), top)} for k in order])
    pa, pb = aggregate.head_pieces(model, a), aggregate.head_pieces(model, b)
    d = model.anatomy.dims
    group = max(1, (d.n_heads or 1) // (d.n_kv_heads or d.n_heads or 1))
    rows = []
    for layer in sorted({k[0] for k in pa}):
        for h in range(d.n_heads or 0):
            keys = [(layer, "q", h), (layer, "o", h), (layer, "k", h // group), (layer, "v", h // group)]
            xa = [t for k in keys for t in pa.get(k, [])]
            xb = [t for k in keys for t in pb.get(k, [])]
            if xa:
                rows.append({"layer": layer, "head": h, **overlap(torch.cat(xa), torch.cat(xb), top)})
    return {"model": pd.DataFrame([model_row]), "tensors": tensors, "layers": layers, "heads": pd.DataFrame(rows)}


# -- the probe ------------------------------------------------------------------------------------
@dataclass
class FisherResult:
    """The Fisher probe's tables (one row per tensor, layer, query head, MLP neuron), its spectrum,
    and optionally pruning curves and dataset overlaps."""

    kind: str
    diagonal: Diagonal
    tensors: pd.DataFrame
    layers: pd.DataFrame
    heads: pd.DataFrame
    neurons: pd.DataFrame
    spectrum: GramSpectrum | None = None
    options: FisherOptions = field(default_factory=FisherOptions)
    pruning: Any = None  # PruningResult
    overlaps: dict[str, dict[str, pd.DataFrame]] = field(default_factory=dict)
    data: str = ""

    @property
    def trace(self) -> float:
        return self.diagonal.trace

    def summary(self) -> dict[str, Any]:
        out = {"kind": self.kind, "trace": self.trace, "examples": self.diagonal.examples,
               "parameters": int(sum(v.numel() for v in self.diagonal.values.values())),
               "chunk_rows": self.diagonal.rows}
        if self.spectrum is not None:
            top = self.spectrum.top(self.options.top_k)
            out.update(top_eigenvalues=[float(v) for v in top], empirical_trace=self.spectrum.trace,
                       top_share=float(top.sum() / self.spectrum.trace) if self.spectrum.trace > 0 else None)
        return out

    def to_dict(self) -> dict[str, Any]:
        out = {"summary": self.summary(), "options": asdict(self.options), "data": self.data,
               "tensors": self.tensors.to_dict(orient="records"), "layers": self.layers.to_dict(orient="records"),
               "heads": self.heads.to_dict(orient="records"), "neurons": self.neurons.to_dict(orient="records")}
        if self.spectrum is not None:
            out["spectrum"] = self.spectrum.to_dict(self.options.top_k)
        if self.pruning is not None:
            out["pruning"] = self.pruning.to_dict()
        if self.overlaps:
            out["overlap"] = {k: {part: frame.to_dict(orient="records") for part, frame in v.items()}
                              for k, v in self.overlaps.items()}
        return out


def fisher_tables(model: RunnableModel, diag: Diagonal) -> dict[str, pd.DataFrame]:
    return {"tensors": aggregate.tensor_table(model, diag.values), "layers": aggregate.layer_table(model, diag.values),
            "heads": aggregate.head_table(model, diag.values), "neurons": aggregate.neuron_table(model, diag.values)}


def fisher_probe(objective: Objective, options: FisherOptions | None = None, *, prune: Sequence[float] | None = None,
                 held_out: ProbeData | None = None, others: Mapping[str, ProbeData] | None = None, store: Any = None,
                 cache: bool = True, progress: Progress | None = None) -> FisherResult:
    """The diagonal (``options.kind``), its tables, the empirical Fisher's top eigenvalues, and with
    ``prune`` the pruning curves on ``held_out`` batches, with ``others`` the overlap with the
    Fisher on each other dataset."""
    from . import probe_key

    options = options or FisherOptions()
    model = objective.model
    key = probe_key(model, objective.data)
    diag = fisher_diagonal(objective, options, store=store, key=key, cache=cache, progress=progress)
    spectrum = None
    if options.top_k > 0:
        spectrum = gram_spectrum(objective, options, store=store, key=key, cache=cache, progress=progress)
    result = FisherResult(options.kind, diag, **fisher_tables(model, diag), spectrum=spectrum, options=options,
                          data=objective.data.description)
    if prune:
        from .prune import pruning_probe

        if held_out is None:
            raise LayerscopeError("pruning curves need held-out batches")
        result.pruning = pruning_probe(objective, Objective(model, held_out), diag.values, prune, store=store,
                                       cache=cache, fisher_tag=options.diag_tag(), progress=progress)
    for label, other in (others or {}).items():
        other_obj = Objective(model, other)
        d2 = fisher_diagonal(other_obj, options, store=store, key=probe_key(model, other), cache=cache, progress=progress)
        result.overlaps[label] = overlap_tables(model, diag.values, d2.values)
        if result.pruning is not None:  # do the two datasets prune the same weights (Fisher scores)?
            from .prune import mask_iou, prunable, prune_order, pruned_mask, scores

            names = prunable(model)
            order = prune_order(scores("fisher", model, names, fisher=d2.values), names)
            result.overlaps[label]["masks"] = pd.DataFrame(
                [{"sparsity": s, "iou": mask_iou(result.pruning.masks["fisher"][s], pruned_mask(order, s))}
                 for s in result.pruning.masks["fisher"]])
    return result
