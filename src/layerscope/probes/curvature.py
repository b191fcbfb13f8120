"""The Hessian probe: top-k and most negative eigenvalues, trace, spectral density, and per-block curvature.

Every part is stored as soon as it is computed, under (weights hash : data hash, part, parameters),
so a run stopped anywhere (Ctrl-C) resumes at the next part and an identical re-run computes nothing.

Blocks (the Hessian restricted to a set of parameters, the others held fixed):
``layer`` — all parameters of one transformer layer, plus one block for those outside any layer
(embeddings, final norm, head); ``type`` — all parameters of one role across layers (attn.q, mlp.down,
norm, ...; the anatomy's roles). Per block: the top eigenvalue (Lanczos on H_BB) and the trace (from
the whole-model Hutchinson samples, so it costs no extra product).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from ..errors import LayerscopeError
from .hessian import HessianOperator
from .lanczos import Density, EigenResult, extreme_eigenpairs, slq
from .objective import Objective
from .trace import TraceEstimate, hutchinson

BLOCK_KINDS = ("layer", "type")
OUTSIDE = "outside layers"


@dataclass(frozen=True)
class HessianOptions:
    """top_k: eigenvalues to report; tol: Ritz residual / max|θ| to stop at (the stopping rule in
    ``lanczos.py``); max_iter: Lanczos steps at most. trace_*: Hutchinson budget (min, max samples,
    target standard error relative to the estimate; None = always max). density_*: SLQ runs and steps.
    blocks: which block families to probe; block_tol / block_max_iter: their Lanczos rule."""

    top_k: int = 5
    tol: float = 1e-4
    max_iter: int = 100
    trace_min: int = 10
    trace_max: int = 100
    trace_rel_error: float | None = 0.05
    density_runs: int = 4
    density_steps: int = 40
    blocks: tuple[str, ...] = BLOCK_KINDS
    block_tol: float = 1e-3
    block_max_iter: int = 40
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("top_k", "max_iter", "trace_min", "trace_max", "density_runs", "density_steps", "block_max_iter"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise LayerscopeError(f"hessian: {name} must be a positive integer, got {v!r}")
        if not 0 < self.tol < 1 or not 0 < self.block_tol < 1:
            raise LayerscopeError("hessian: tol and block_tol must lie in (0, 1)")
        unknown = set(self.blocks) - set(BLOCK_KINDS)
        if unknown:
            raise LayerscopeError(f"hessian: unknown block kind(s) {', '.join(sorted(unknown))} (known: {', '.join(BLOCK_KINDS)})")

    def part(self, name: str) -> dict[str, Any]:
        """The options a part's stored result depends on."""
        keys = {"eigen": ("top_k", "tol", "max_iter", "seed"),
                "trace": ("trace_min", "trace_max", "trace_rel_error", "seed"),
                "density": ("density_runs", "density_steps", "seed"),
                "block": ("block_tol", "block_max_iter", "seed")}[name]
        return {k: getattr(self, k) for k in keys}


@dataclass
class HessianResult:
    """eigenvalues: rank, eigenvalue, residual (top-k, largest first); bottom: the smallest eigenvalue
    and its residual; trace; density (SLQ); blocks: one row per block; hvps: products computed in this
    run (0 when everything came from the store); micro_batch: rows per micro-batch used (None: whole
    batches)."""

    eigenvalues: pd.DataFrame
    bottom: dict[str, Any]
    eigen_info: dict[str, Any]
    trace: TraceEstimate
    density: Density
    blocks: pd.DataFrame
    parameters: int
    hvps: int = 0
    micro_batch: int | None = None
    seconds: float = 0.0
    options: HessianOptions = field(default_factory=HessianOptions)

    @property
    def is_minimum(self) -> bool:
        """No negative eigenvalue beyond its own residual (and the trace's noise is irrelevant here)."""
        return self.bottom["eigenvalue"] >= -self.bottom["residual"]

    def summary(self) -> dict[str, Any]:
        top = float(self.eigenvalues["eigenvalue"].iloc[0])
        return {"top_eigenvalue": top, "top_residual": float(self.eigenvalues["residual"].iloc[0]),
                "min_eigenvalue": self.bottom["eigenvalue"], "min_residual": self.bottom["residual"],
                "negative_to_top_ratio": self.bottom["eigenvalue"] / top if top else None,
                "trace": self.trace.estimate, "trace_std_error": self.trace.std_error, "trace_samples": self.trace.samples,
                "lanczos_iterations": self.eigen_info["iterations"], "converged": self.eigen_info["converged"],
                "parameters": self.parameters, "hvps": self.hvps, "micro_batch": self.micro_batch}

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "eigenvalues": self.eigenvalues.to_dict(orient="records"),
                "bottom": self.bottom, "trace": self.trace.to_dict(), "density": self.density.to_dict(),
                "blocks": self.blocks.to_dict(orient="records"), "options": asdict(self.options)}


def block_groups(model, kinds: tuple[str, ...]) -> dict[tuple[str, str], list[str]]:
    """{(kind, block name): parameter names}, from the anatomy's layers and roles."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in model.params:
        e = model.anatomy.entries[name]
        if "layer" in kinds:
            key = ("layer", f"layer {e.layer}" if e.layer is not None else OUTSIDE)
            groups.setdefault(key, []).append(name)
        if "type" in kinds:
            groups.setdefault(("type", e.role), []).append(name)

    def order(item):
        (kind, block), _ = item
        if kind == "layer":
            return (0, 10**9 if block == OUTSIDE else int(block.split()[1]), "")
        return (1, 0, block)

    return dict(sorted(groups.items(), key=order))


class _Counter:
    """Counts HVPs for the progress display; the planned total shrinks as parts stop early."""

    def __init__(self, progress: Callable[[str, int, int], None] | None, planned: int):
        self.progress, self.done, self.planned = progress, 0, planned

    def tick(self) -> None:
        self.done += 1
        self.report()

    def finish_part(self, unused: int) -> None:
        self.planned -= max(0, unused)
        self.report()

    def report(self) -> None:
        if self.progress:
            self.progress("Hessian-vector products", self.done, max(self.planned, self.done))


def hessian_probe(objective: Objective, options: HessianOptions | None = None, *, store: Any = None, key: str | None = None,
                  cache: bool = True, progress: Callable[[str, int, int], None] | None = None) -> HessianResult:
    """Run (or read from ``store`` under ``key``) every part of the Hessian probe."""
    options = options or HessianOptions()
    started = time.perf_counter()
    model = objective.model
    groups = block_groups(model, options.blocks)
    op = HessianOperator(objective)
    n, dt, dev = op.dim, op.dtype, op.device
    dtype_tag = str(dt).removeprefix("torch.")

    def cached(kind: str, params: dict) -> tuple[Any, str]:
        text = json.dumps({**params, "dtype": dtype_tag}, sort_keys=True)
        if store is not None and key is not None and cache:
            return store.artifact(key, kind, text), text
        return None, text

    def save(kind: str, text: str, payload: Any) -> None:
        if store is not None and key is not None:
            store.put_artifact(key, kind, text, payload)

    planned = options.max_iter + options.trace_max + options.density_runs * options.density_steps \
        + len(groups) * options.block_max_iter
    counter = _Counter(progress, planned)
    op.on_hvp = counter.tick

    # 1. top-k and the bottom eigenvalue
    stored, text = cached("hessian.eigen", options.part("eigen"))
    if stored is None:
        res = extreme_eigenpairs(op.matvec_tensor, n, options.top_k, tol=options.tol, max_iter=options.max_iter,
                                 seed=options.seed, dtype=dt, device=dev)
        stored = _eigen_payload(res)
        save("hessian.eigen", text, stored)
        counter.finish_part(options.max_iter - res.iterations)
    else:
        counter.finish_part(options.max_iter)
    eigen = pd.DataFrame(stored["top"])

    # 2. trace, whole model and every block from the same samples
    names_blocks = {f"{kind}:{block}": names for (kind, block), names in groups.items()}
    stored_t, text = cached("hessian.trace", {**options.part("trace"), "blocks": sorted(names_blocks)})
    if stored_t is None:
        tr = hutchinson(op.matvec_tensor, n, min_samples=options.trace_min, max_samples=options.trace_max,
                        rel_error=options.trace_rel_error, seed=options.seed + 1, blocks=op.block_slices(names_blocks),
                        dtype=dt, device=dev)
        save("hessian.trace", text, tr.to_dict())
        counter.finish_part(options.trace_max - tr.samples)
    else:
        tr = TraceEstimate.from_dict(stored_t)
        counter.finish_part(options.trace_max)

    # 3. spectral density
    stored_d, text = cached("hessian.density", options.part("density"))
    if stored_d is None:
        density = slq(op.matvec_tensor, n, runs=options.density_runs, steps=options.density_steps, seed=options.seed + 2,
                      dtype=dt, device=dev)
        save("hessian.density", text, density.to_dict())
        counter.finish_part(options.density_runs * options.density_steps - options.density_runs * density.steps)
    else:
        density = Density.from_dict(stored_d)
        counter.finish_part(options.density_runs * options.density_steps)

    # 4. blocks: top eigenvalue of H_BB
    rows = []
    for (kind, block), names in groups.items():
        stored_b, text = cached(f"hessian.block:{kind}:{block}", {**options.part("block"), "names": names})
        if stored_b is None:
            bop = HessianOperator(objective, names, on_hvp=counter.tick)
            res = extreme_eigenpairs(bop.matvec_tensor, bop.dim, 1, bottom=True, tol=options.block_tol,
                                     max_iter=options.block_max_iter, seed=options.seed + 3, dtype=dt, device=dev)
            op.hvps += bop.hvps
            stored_b = {"top_eigenvalue": float(res.top[0]), "top_residual": float(res.top_residuals[0]),
                        "min_eigenvalue": res.bottom, "min_residual": res.bottom_residual, "iterations": res.iterations,
                        "converged": res.converged, "parameters": bop.dim}
            save(f"hessian.block:{kind}:{block}", text, stored_b)
            counter.finish_part(options.block_max_iter - res.iterations)
        else:
            counter.finish_part(options.block_max_iter)
        est, se = tr.blocks.get(f"{kind}:{block}", (np.nan, np.nan))
        layer = int(block.split()[1]) if kind == "layer" and block != OUTSIDE else None
        rows.append({"kind": kind, "block": block, "layer": layer, "tensors": len(names), **stored_b,
                     "trace": est, "trace_std_error": se})
    blocks = pd.DataFrame(rows)
    if len(blocks):
        blocks["layer"] = blocks["layer"].astype("Int64")
    return HessianResult(eigenvalues=eigen, bottom=stored["bottom"], eigen_info=stored["info"], trace=tr, density=density,
                         blocks=blocks, parameters=n, hvps=op.hvps, micro_batch=objective.micro_batch,
                         seconds=time.perf_counter() - started, options=options)


def _eigen_payload(res: EigenResult) -> dict[str, Any]:
    top = [{"rank": i + 1, "eigenvalue": float(v), "residual": float(r)}
           for i, (v, r) in enumerate(zip(res.top, res.top_residuals))]
    return {"top": top, "bottom": {"eigenvalue": res.bottom, "residual": res.bottom_residual},
            "info": {"iterations": res.iterations, "converged": res.converged, "exhausted": res.exhausted}}


def top_eigenvectors(objective: Objective, k: int = 1, *, tol: float = 1e-4, max_iter: int = 100,
                     seed: int = 0) -> tuple[np.ndarray, list[dict[str, torch.Tensor]]]:
    """The top-k eigenvalues and their eigenvectors as {param name: tensor} dicts (for landscapes)."""
    op = HessianOperator(objective)
    res = extreme_eigenpairs(op.matvec_tensor, op.dim, k, bottom=False, tol=tol, max_iter=max_iter, seed=seed,
                             dtype=op.dtype, device=op.device, vectors=True)
    vecs = [{n: t for n, t in zip(op.names, op.split(v))} for v in res.vectors]
    return res.top, vecs
