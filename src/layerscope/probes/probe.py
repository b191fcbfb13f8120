"""``layerscope.probe(...)``: load the model and the data once, then run the requested probes.

Each probe is a step that takes the shared :class:`Objective` and returns its result; the loss is
always computed (it is what every probe refers back to). A new probe (Fisher, landscape, ...) is one
more entry in :data:`STEPS` and one more flag; results come back in ``ProbeResult.results[name]``.
Everything is stored under (weights hash : data hash, part, parameters).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from ..config import Config
from ..errors import LayerscopeError
from .curvature import HessianOptions, HessianResult, hessian_probe
from .data import ProbeData, load_data
from .model import RunnableModel, load_model
from .objective import LossResult, Objective

Progress = Callable[[str, int, int], None]


@dataclass
class ProbeResult:
    """model: the RunnableModel; data: the batches (``data.hash``, ``data.description``); loss: the
    mean token cross-entropy and perplexity; results: one entry per probe run (``"hessian"`` ->
    HessianResult, ...)."""

    model: RunnableModel
    data: ProbeData
    loss: LossResult
    results: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def hessian(self) -> HessianResult | None:
        return self.results.get("hessian")

    @property
    def fisher(self) -> Any:
        """The FisherResult (``probes.fisher``), when the Fisher probe ran."""
        return self.results.get("fisher")

    @property
    def gradients(self) -> Any:
        """probes.gradients.GradientHealth, when run."""
        return self.results.get("gradients")

    def tables(self) -> dict[str, pd.DataFrame]:
        """The DataFrames: per-parameter anatomy, and each probe's tables."""
        out = {"parameters": self.model.param_table()}
        if self.hessian is not None:
            out["hessian_eigenvalues"] = self.hessian.eigenvalues
            out["hessian_blocks"] = self.hessian.blocks
        if self.fisher is not None:
            for part in ("tensors", "layers", "heads", "neurons"):
                out[f"fisher_{part}"] = getattr(self.fisher, part)
            if self.fisher.pruning is not None:
                out["pruning_curves"] = self.fisher.pruning.curves
        if self.gradients is not None:
            out["gradient_tensors"] = self.gradients.tensors
            out["gradient_groups"] = self.gradients.groups
            if self.gradients.neurons is not None:
                out["mlp_neurons"] = self.gradients.neurons
        return out

    def to_dict(self) -> dict[str, Any]:
        out = {"model": self.model.label, "kind": self.model.kind, "weights_hash": self.model.weights_hash,
               "parameters": self.model.parameter_count, "device": str(self.model.device),
               "dtype": str(self.model.dtype).removeprefix("torch."),
               "data": {"description": self.data.description, "hash": self.data.hash, "tokens": self.data.tokens,
                        **self.data.params},
               "loss": {"loss": self.loss.loss, "perplexity": self.loss.perplexity, "tokens": self.loss.tokens,
                        "batches": self.loss.batches}, "seconds": self.seconds}
        for name, r in self.results.items():
            out[name] = r.to_dict() if hasattr(r, "to_dict") else r
        return out

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        if path.suffix.lower() != ".json":
            raise LayerscopeError(f"--out must be a .json file, got {path}")
        from ..views import write_json

        return write_json(self.to_dict(), path, default=_jsonable)


def _loss_identity(loss_fn: Callable) -> str:
    """A stable name for a user's loss function: its class or qualified name and its repr."""
    import hashlib

    code = getattr(loss_fn, "__code__", None)
    if code is not None:  # a function: its name and its bytecode and constants (its repr holds an address)
        text = f"{loss_fn.__module__}.{loss_fn.__qualname__}|{code.co_code.hex()}|{code.co_consts!r}"
    else:  # a loss module or callable object: its class and its plain settings (label_smoothing, reduction...)
        settings = {k: v for k, v in sorted(vars(loss_fn).items())
                    if not k.startswith("_") and isinstance(v, (int, float, str, bool, type(None)))}
        text = f"{type(loss_fn).__module__}.{type(loss_fn).__qualname__}|{settings!r}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def _hessian_step(objective: Objective, options: dict, store: Any, key: str, cache: bool, progress: Progress | None):
    opts = options.get("hessian")
    if not isinstance(opts, HessianOptions):
        opts = HessianOptions(**(opts or {}))
    return hessian_probe(objective, opts, store=store, key=key, cache=cache, progress=progress)


def _fisher_step(objective: Objective, options: dict, store: Any, key: str, cache: bool, progress: Progress | None):
    """The Fisher probe; with ``prune`` the last ``held_out`` batches (default a quarter) are held out
    for the pruning curves and the Fisher is taken on the rest; ``fisher_others`` (label ->
    ProbeData) are compared with it (Fisher overlap)."""
    from .fisher import FisherOptions, fisher_probe
    from .prune import parse_sparsities

    opts = options.get("fisher")
    if not isinstance(opts, FisherOptions):
        opts = FisherOptions(**(opts or {}))
    prune = parse_sparsities(options["prune"]) if options.get("prune") else None
    held = None
    if prune:
        n = objective.n_batches
        k = options.get("held_out") or max(1, n // 4)
        if n < 2 or not 0 < k < n:
            raise LayerscopeError(f"--prune needs batches to hold out: --held-out {k} of --batches {n} (use --batches >= 2)")
        calibration, held = objective.data.split(k)
        objective = Objective(objective.model, calibration)
    return fisher_probe(objective, opts, prune=prune, held_out=held, others=options.get("fisher_others"), store=store,
                        cache=cache, progress=progress)


def _gradients_step(objective: Objective, options: dict, store: Any, key: str, cache: bool, progress: Progress | None):
    from .gradients import GradientOptions, gradient_health

    opts = options.get("gradients")
    if not isinstance(opts, GradientOptions):
        opts = GradientOptions(**(opts or {}))
    return gradient_health(objective, opts, store=store if cache else None, progress=progress)


#: name -> step(objective, options, store, key, cache, progress). Probes are run in this order.
STEPS: dict[str, Callable[..., Any]] = {"hessian": _hessian_step, "fisher": _fisher_step, "gradients": _gradients_step}


def probe(model: Any, data: Any = None, *, hessian: bool | HessianOptions | dict = False, fisher: Any = False,
          prune: Any = None, held_out: int | None = None, compare_data: Any = None, gradients: bool | Any = False,
          loss_fn: Callable | None = None,
          text_field: str | None = None, seq_len: int | None = None, batches: int = 4, batch_size: int = 8,
          seed: int = 0, device: str | None = None, dtype: str | None = None, config: Config | None = None,
          revision: str | None = None, progress: Progress | None = None, **probe_options: Any) -> ProbeResult:
    """Run ``model`` (a checkpoint path, hub id, nn.Module or RunnableModel) on ``data`` and probe it.

    hessian: True (defaults), a HessianOptions, or a dict of its fields. fisher: the same for the
    Fisher probe (``probes.fisher.FisherOptions``); prune: sparsities (e.g. [0.1, 0.3, 0.5]; implies
    fisher) for pruning curves on ``held_out`` held-out batches; compare_data: other data (paths or
    texts), each compared with ``data`` by Fisher overlap. loss_fn: for a module that is
    not a transformers LM; ``data`` is then its ``[(inputs, targets), ...]`` batches (PyHessian and
    curvlinops' call shape). gradients: True, a ``probes.gradients.GradientOptions`` or a dict of its
    fields (gradient health: norms, noise scale, SNR, flags, dead MLP neurons). Without ``data`` an LM is evaluated on the default text
    (``probes.data.default_text``)."""
    from ..store import Store

    started = time.perf_counter()
    config = config or Config()
    device = device or config.device
    store = Store(config.resolved_store())
    try:
        runnable = load_model(model, device=device, dtype=dtype, revision=revision, store=store, loss_fn=loss_fn)
        probe_data = load_data(runnable, data, text_field=text_field, seq_len=seq_len, batches=batches,
                               batch_size=batch_size, seed=seed)
        objective = Objective(runnable, probe_data)
        key = f"{runnable.weights_hash}:{probe_data.hash}"
        if runnable.loss_fn is not None:  # a custom loss is part of what is probed
            key += ":" + _loss_identity(runnable.loss_fn)
        dtype_tag = json.dumps({"dtype": str(runnable.dtype).removeprefix("torch.")})
        stored = store.artifact(key, "loss", dtype_tag) if config.cache else None
        if stored is None:
            loss = objective.evaluate()
            store.put_artifact(key, "loss", dtype_tag, loss.__dict__)
        else:
            loss = LossResult(**stored)
        others = {}
        for i, other in enumerate(compare_data or []):
            label = Path(str(other)).name if isinstance(other, (str, os.PathLike)) else f"data {i + 2}"
            first = Path(str(data)).name if isinstance(data, (str, os.PathLike)) else "default text" if data is None else "data 1"
            others[f"{first} ~ {label}"] = load_data(
                runnable, other, text_field=text_field, seq_len=seq_len, batches=batches, batch_size=batch_size, seed=seed)
        options = {"hessian": hessian if not isinstance(hessian, bool) else {},
                   "fisher": fisher if not isinstance(fisher, bool) else {}, "prune": prune, "held_out": held_out,
                   "fisher_others": others, "gradients": gradients if not isinstance(gradients, bool) else {},
                   **probe_options}
        wanted = {"hessian": bool(hessian), "fisher": bool(fisher) or bool(prune) or bool(others),
                  "gradients": bool(gradients)}
        result = ProbeResult(runnable, probe_data, loss)
        for name, step in STEPS.items():
            if wanted.get(name):
                result.results[name] = step(objective, options, store, key, config.cache, progress)
    finally:
        store.close()
    result.seconds = time.perf_counter() - started
    return result


def print_probe(result: ProbeResult, console: Any = None) -> None:
    """Console view: model and data, the loss, then each probe's summary and tables."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from ..views import _fmt, human_count

    console = console or Console()
    m, d = result.model, result.data
    console.print(escape(f"{m.label}: {m.kind} model, {human_count(m.parameter_count)} parameters probed, "
                         f"{str(m.dtype).removeprefix('torch.')} on {m.device}"))
    console.print(escape(f"data: {d.description}; {d.n_batches} batches, {d.tokens:,} target tokens; hash {d.hash[:12]}"))
    console.print(f"[bold]loss[/bold] {result.loss.loss:.4f} nats/token, perplexity {_fmt(result.loss.perplexity)}")
    if result.fisher is not None:
        from .fisher_cli import print_fisher

        print_fisher(result.fisher, console)
    if result.gradients is not None:
        from .gradients import print_gradients

        print_gradients(result.gradients, console)
    h = result.hessian
    if h is None:
        return
    s = h.summary()
    table = Table(title=f"Hessian top-{len(h.eigenvalues)} eigenvalues (Lanczos, {s['lanczos_iterations']} steps, "
                        f"{'converged' if s['converged'] else 'NOT converged'})", title_justify="left")
    for col in ("rank", "eigenvalue", "Ritz residual"):
        table.add_column(col, justify="right")
    for row in h.eigenvalues.itertuples():
        table.add_row(str(row.rank), f"{row.eigenvalue:.6g}", f"{row.residual:.2e}")
    table.add_row("min", f"{h.bottom['eigenvalue']:.6g}", f"{h.bottom['residual']:.2e}")
    console.print(table)
    verdict = "a minimum (no negative eigenvalue beyond its residual)" if h.is_minimum else \
        f"not a minimum: λ_min/λ_max = {s['negative_to_top_ratio']:.3g}"
    console.print(f"trace {s['trace']:.6g} ± {s['trace_std_error']:.2g} (Hutchinson, {s['trace_samples']} Rademacher "
                  f"samples); {verdict}")
    if len(h.blocks):
        table = Table(title="curvature per block (Hessian restricted to the block)", title_justify="left")
        for col in ("kind", "block", "parameters", "top eigenvalue", "min eigenvalue", "trace ± s.e."):
            table.add_column(col, justify="left" if col in ("kind", "block") else "right")
        for r in h.blocks.itertuples():
            table.add_row(r.kind, escape(str(r.block)), f"{r.parameters:,}", f"{r.top_eigenvalue:.4g}",
                          f"{r.min_eigenvalue:.4g}", f"{r.trace:.4g} ± {r.trace_std_error:.2g}")
        console.print(table)
    console.print(f"{h.hvps} Hessian-vector products in {h.seconds:.1f} s"
                  + (f" (micro-batch {h.micro_batch} after CUDA out-of-memory)" if h.micro_batch else "")
                  + ("; everything else from the store" if h.hvps == 0 else ""))
