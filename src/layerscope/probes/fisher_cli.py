"""Command-line pieces of the Fisher probe: the ``layerscope probe`` flags (``--fisher``, ``--prune``,
...), what they run, the console view, and the ``layerscope merge`` command.

Kept apart from ``cli.py`` so the probe command only calls :func:`add_fisher_arguments` and
:func:`fisher_from_args`; nothing heavy is imported until a Fisher flag is used.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Sequence

from ..cli_args import (checkpoint, device, float_between, int_at_least, output_file, output_folder,
                        store_file)
from ..errors import LayerscopeError

Progress = Callable[[str, int, int], None]


def parse_size(text: str, flag: str) -> int:
    """``512MB`` / ``2GB`` / ``64k`` -> bytes."""
    units = {"kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "b": 1, "": 1}
    t = text.strip().lower()
    number = t.rstrip("kmgb")
    try:
        return int(float(number) * units[t[len(number):]])
    except (ValueError, KeyError):
        raise LayerscopeError(f"{flag}: expected a size such as 512MB or 2GB, got {text!r}") from None


def add_fisher_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Fisher information (--fisher)")
    g.add_argument("--fisher", action="store_true", help="diagonal Fisher per tensor, layer, head and MLP neuron, "
                   "its trace and the empirical Fisher's top eigenvalues")
    g.add_argument("--fisher-kind", default="empirical", choices=["empirical", "true"],
                   help="empirical: gradients at the data's targets; true: Monte-Carlo, targets drawn from the "
                        "model's own predictions (default empirical)")
    g.add_argument("--fisher-samples", type=int, default=1, help="draws per example for --fisher-kind true (default 1)")
    g.add_argument("--fisher-top-k", type=int, default=10, help="top eigenvalues of the empirical Fisher (0: none; default 10)")
    g.add_argument("--fisher-memory", default="1GB", help="memory for one chunk of per-example gradients (default 1GB)")
    g.add_argument("--prune", help="sparsities such as 0.1,0.3,0.5: held-out loss after pruning by magnitude, Fisher "
                                   "and Taylor scores (implies --fisher)")
    g.add_argument("--held-out", type=int, help="batches held out for the pruning curves (default: a quarter, at least 1)")


def fisher_options(args: argparse.Namespace, seed: int = 0) -> Any:
    from .fisher import FisherOptions

    return FisherOptions(kind=args.fisher_kind, samples=args.fisher_samples, top_k=args.fisher_top_k,
                         memory=parse_size(args.fisher_memory, "--fisher-memory"), seed=seed)


def wants_fisher(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "fisher", False) or getattr(args, "prune", None))


def fisher_from_args(args: argparse.Namespace, model: Any, datas: Sequence[Any], *, labels: Sequence[str] | None = None,
                     store: Any = None, cache: bool = True, seed: int = 0, progress: Progress | None = None) -> Any:
    """Run the Fisher probe as the flags say. ``datas``: ProbeData, the first is the probe's data,
    the others are compared with it (Fisher overlap, and pruned-mask IoU with ``--prune``)."""
    from .fisher import fisher_probe
    from .objective import Objective
    from .prune import parse_sparsities

    options = fisher_options(args, seed)
    sparsities = parse_sparsities(args.prune) if args.prune else None
    data, held = datas[0], None
    if sparsities:
        n = data.n_batches
        k = args.held_out if args.held_out is not None else max(1, n // 4)
        if n < 2 or not 0 < k < n:
            raise LayerscopeError(f"--prune needs batches to hold out: --held-out {k} of --batches {n} (use --batches >= 2)")
        data, held = data.split(k)
    labels = list(labels) if labels else [f"data {i + 1}" for i in range(len(datas))]
    others = {f"{labels[0]} ~ {lb}": d for lb, d in zip(labels[1:], datas[1:])}
    return fisher_probe(Objective(model, data), options, prune=sparsities, held_out=held, others=others, store=store,
                        cache=cache, progress=progress)


def print_fisher(result: Any, console: Any, top: int = 10) -> None:
    from rich.table import Table

    s = result.summary()
    console.print(f"[bold]Fisher information[/bold] ({s['kind']}, {s['examples']} examples, {s['parameters']:,} parameters): "
                  f"trace {s['trace']:.6g}")
    if "top_eigenvalues" in s:
        ev = ", ".join(f"{v:.4g}" for v in s["top_eigenvalues"])
        share = f" ({100 * s['top_share']:.1f}% of the trace)" if s.get("top_share") is not None else ""
        console.print(f"  empirical Fisher top eigenvalues (exact, Gram of {result.spectrum.examples} examples): {ev}{share}")
    _frame(console, result.layers, "per layer", ["layer", "fisher", "share", "fisher_mean", "numel"])
    if len(result.heads):
        heads = result.heads.sort_values("fisher", ascending=False).head(top)
        _frame(console, heads, f"top {top} heads (q + o + share of k, v)", ["layer", "head", "fisher", "q", "k", "v", "o"])
    if len(result.neurons):
        neurons = result.neurons.sort_values("fisher", ascending=False).head(top)
        _frame(console, neurons, f"top {top} MLP neurons (up/gate row + down column)", ["layer", "neuron", "fisher", "up", "gate", "down"])
    if result.pruning is not None:
        p = result.pruning
        table = Table(title=f"held-out loss after pruning ({p.prunable:,} prunable weights; {p.held_out})", title_justify="left")
        curves = p.curves
        sparsities = sorted(curves["sparsity"].unique())
        table.add_column("method")
        for sp in sparsities:
            table.add_column(f"{sp:g}", justify="right")
        for m in curves["method"].unique():
            rows = curves[curves["method"] == m].set_index("sparsity")["loss"]
            table.add_row(m, *[f"{rows[sp]:.4f}" for sp in sparsities])
        console.print(table)
        if len(p.iou):
            _frame(console, p.iou, "IoU of pruned sets between methods", ["sparsity", "a", "b", "iou"])
    for label, parts in result.overlaps.items():
        m = parts["model"].iloc[0]
        console.print(f"[bold]Fisher overlap[/bold] {label}: {m['overlap']:.4f} (1 − ½‖√F̂₁ − √F̂₂‖², unit-trace F̂); "
                      f"top-1% shared: {m['top_shared']:.3f}")
        _frame(console, parts["layers"], "overlap per layer", ["layer", "overlap", "top_shared"])
        if "masks" in parts:
            _frame(console, parts["masks"], "IoU of the Fisher pruning masks of the two datasets", ["sparsity", "iou"])


def _frame(console: Any, frame: Any, title: str, columns: list[str]) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    cols = [c for c in columns if c in frame.columns]
    for c in cols:
        table.add_column(c, justify="left" if c in ("a", "b", "method") else "right")
    for row in frame[cols].itertuples(index=False):
        table.add_row(*[v if isinstance(v, str) else f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)


# -- layerscope merge ------------------------------------------------------------------------------
def add_merge_command(sub: Any) -> None:
    mg = sub.add_parser("merge", help="merge fine-tunes of one base: Fisher-weighted, plain average and TIES")
    mg.add_argument("paths", nargs="+", type=checkpoint, metavar="PATH", help="two or more checkpoints to merge (same architecture)")
    mg.add_argument("--base", type=checkpoint, help="the base they were fine-tuned from (needed by TIES)")
    mg.add_argument("--data", action="append", help="text data; once for all models, or once per model in order "
                                                     "(each model's Fisher on its own data); default: the default text")
    mg.add_argument("--text-field", help="field of .jsonl / column of .parquet or datasets (default text)")
    mg.add_argument("--out", type=output_folder, help="folder for the merged checkpoint (safetensors, config, tokenizer)")
    mg.add_argument("--method", default="fisher", choices=["fisher", "average", "ties"],
                    help="which merge to write (all are evaluated; default fisher)")
    mg.add_argument("--fisher-kind", default="empirical", choices=["empirical", "true"], help="Fisher used for weights")
    mg.add_argument("--fisher-samples", type=int_at_least(1), default=1, help="draws per example for --fisher-kind true")
    mg.add_argument("--trim", type=float_between(0, 1), default=0.2, help="TIES: keep this top fraction of each task vector (default 0.2)")
    mg.add_argument("--seq-len", type=int_at_least(2), help="tokens per window (default min(128, the model's context))")
    mg.add_argument("--batches", type=int_at_least(1), default=4, help="batches per dataset (default 4)")
    mg.add_argument("--batch-size", type=int_at_least(1), default=8, help="windows per batch (default 8)")
    mg.add_argument("--seed", type=int, default=0, help="seed for the batches and draws (default 0)")
    mg.add_argument("--device", type=device, help="cpu, cuda, cuda:N or auto")
    mg.add_argument("--json", type=output_file(".json"), help="write the losses and settings as JSON here")
    mg.add_argument("--store", type=store_file, help="SQLite result store (default: the user cache directory)")
    mg.add_argument("--no-cache", action="store_true", help="recompute the Fishers instead of reading the store")


def cmd_merge(args: argparse.Namespace, console: Any) -> int:
    from rich.table import Table

    from ..config import Config
    from ..store import Store
    from ..views import ProgressDisplay, write_json
    from .merge import merge

    config = Config(store=args.store) if args.store else Config()
    with Store(config.resolved_store()) as store, ProgressDisplay("merging") as progress:
        result = merge(args.paths, base=args.base, data=args.data, out=args.out, method=args.method,
                       fisher_kind=args.fisher_kind, samples=args.fisher_samples, keep=args.trim, seq_len=args.seq_len,
                       batches=args.batches, batch_size=args.batch_size, seed=args.seed, text_field=args.text_field,
                       device=args.device or "cpu", store=store, cache=not args.no_cache, progress=progress.update)
    table = Table(title="mean token loss (nats) on each dataset", title_justify="left")
    table.add_column("model")
    for c in result.losses.columns:
        table.add_column(str(c), justify="right")
    for name, row in result.losses.iterrows():
        table.add_row(str(name), *[f"{v:.4f}" for v in row])
    console.print(table)
    for note in result.notes:
        console.print(note)
    if result.written:
        console.print(f"wrote the {args.method} merge to {result.written}")
    if args.json:
        write_json(result.to_dict(), args.json, indent=2, default=str)
        console.print(f"wrote {args.json}")
    return 0
