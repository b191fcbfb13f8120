"""``layerscope`` command line: thin wrappers that build a Config, call the pipeline, pick a view.

Bad input is one line on stderr and exit status 2; a run where some tensor could not be read
exits 1 after writing everything else; Ctrl-C exits 130 with the store intact.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Sequence

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import __version__
from .config import Config
from .errors import LayerscopeError


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint file or folder, or a Hugging Face hub repo id (org/name)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) to pin")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerscope", description="See inside a transformer's weights.")
    parser.add_argument("--version", action="version", version=f"layerscope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="the anatomy: family, dims, parameters, tensors by role")
    _add_common(info)
    info.add_argument("--json", action="store_true", help="print the anatomy as JSON")

    an = sub.add_parser("analyze", help="statistics and spectral metrics of every matrix")
    _add_common(an)
    an.add_argument("--metrics", help="comma-separated metric or group names (stats, spectral, all); see 'layerscope metrics'")
    an.add_argument("--out", help="write the full table to .csv, .parquet or .json")
    an.add_argument("--device", help="cpu, cuda, cuda:N or auto (CUDA out-of-memory falls back to the CPU)")
    an.add_argument("--workers", type=int, help="tensors analysed at once (default: one per core, at most 4)")
    an.add_argument("--dtype", choices=["float64", "float32"], help="spectrum precision (default float64)")
    an.add_argument("--store", help="SQLite result store (default: the user cache directory)")
    an.add_argument("--no-cache", action="store_true", help="recompute everything instead of reading the store")
    an.add_argument("--no-slices", action="store_true", help="do not analyse q/k/v slices of fused matrices and MoE experts separately")
    an.add_argument("--config", help="JSON, TOML or YAML file with Config keys; flags override it")
    an.add_argument("--plot", help="folder for figures (MLP down-projection explained-variance curves)")
    an.add_argument("--quiet", action="store_true", help="no progress bar and no summary")

    hd = sub.add_parser("heads", help="QK and OV circuits of every attention head (factored, GQA aware)")
    _add_common(hd)
    hd.add_argument("--out", help="write the per-head table to .csv, .parquet or .json (JSON keeps the top eigenvalues)")
    hd.add_argument("--plot", help="folder for layer × head heatmaps and eigenvalue plots")
    hd.add_argument("--select", help="heads to plot eigenvalues of, as LAYER.HEAD list (default: most and least copying)")
    hd.add_argument("--low-pct", type=float, default=25.0, help="low-rank heads: qk_entropy_rank at or below this percentile")
    hd.add_argument("--high-pct", type=float, default=75.0, help="high-rank heads: qk_entropy_rank at or above this percentile")
    hd.add_argument("--store", help="SQLite result store")
    hd.add_argument("--no-cache", action="store_true", help="recompute instead of reading the store")
    hd.add_argument("--config", help="JSON, TOML or YAML config file")

    ms = sub.add_parser("metrics", help="list the available metrics")
    ms.add_argument("--config", help="config file (energy levels change the metric names)")
    return parser


def _config(args: argparse.Namespace) -> Config:
    config = Config.from_file(args.config) if getattr(args, "config", None) else Config()
    overrides: dict[str, Any] = {}
    for flag, key in (("metrics", "metrics"), ("device", "device"), ("workers", "workers"), ("dtype", "dtype"), ("store", "store")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    if getattr(args, "no_cache", False):
        overrides["cache"] = False
    if getattr(args, "no_slices", False):
        overrides["slices"] = False
    return config.replace(**overrides)


def cmd_info(args: argparse.Namespace, console: Console) -> int:
    from .anatomy import build_anatomy
    from .sources import open_source
    from .views import print_info

    source = open_source(args.path, args.revision)
    anatomy = build_anatomy(source.infos, source.config)
    if args.json:
        print(json.dumps({"source": source.label, "format": source.format, **anatomy.to_dict()}, indent=2))
    else:
        print_info(anatomy, source.label, source.format, console)
    return 0


def cmd_analyze(args: argparse.Namespace, console: Console) -> int:
    from .metrics import select_metrics
    from .pipeline import analyze
    from .views import print_summary, write_table

    config = _config(args)
    select_metrics(config)  # reject unknown metric names before any work
    err = Console(stderr=True)
    progress = Progress(TextColumn("[bold]analyzing"), BarColumn(), MofNCompleteColumn(), TextColumn("tensors"),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[current]}"),
                        console=err, disable=args.quiet, transient=False)
    task = None

    def on_progress(done: int, total: int, name: str) -> None:
        nonlocal task
        if task is None:
            task = progress.add_task("analyze", total=total, current="")
        progress.update(task, completed=done, current=name[-48:])

    with progress:
        result = analyze(args.path, config, revision=args.revision, progress=on_progress)
    if not args.quiet:
        print_summary(result, console)
    if args.out:
        path = write_table(result.table, args.out)
        console.print(f"wrote {len(result.table)} rows to {path}")
    if args.plot and (result.table["role"] == "mlp.down").any():
        from .mlp import mlp_down_spectra
        from .plots import explained_variance_curves

        spectra = mlp_down_spectra(result.source, config)
        curves = [(f"layer {r.layer} (κ={r.condition_number:.3g})", r.explained_variance) for r in spectra.itertuples()]
        console.print(f"wrote {explained_variance_curves(curves, args.plot)}")
    if result.unreadable:
        err.print(f"[red]{len(result.unreadable)} tensor(s) could not be read[/red]: {', '.join(result.unreadable[:5])}")
    return result.exit_code


def _parse_heads(text: str) -> list[tuple[int, int]]:
    try:
        return [(int(a), int(b)) for a, b in (item.strip().split(".") for item in text.split(",") if item.strip())]
    except ValueError:
        raise LayerscopeError(f"--select: expected LAYER.HEAD items such as 0.3,5.11, got {text!r}") from None


def cmd_heads(args: argparse.Namespace, console: Console) -> int:
    from .heads import heads
    from .views import print_heads

    config = _config(args)
    selected = _parse_heads(args.select) if args.select else None
    result = heads(args.path, config, low_pct=args.low_pct, high_pct=args.high_pct, revision=args.revision)
    print_heads(result, console)
    if args.out:
        result.save(args.out)
        console.print(f"wrote {len(result.table)} heads to {args.out}")
    if args.plot:
        from .plots import head_eigenvalues, head_heatmaps

        paths = head_heatmaps(result.table, args.plot, title=result.source.display_name)
        if selected is None:
            ranked = result.table.sort_values("ov_copying_score")
            selected = [(int(r.layer), int(r.head)) for r in pd.concat([ranked.head(3), ranked.tail(3)]).itertuples()]
        paths.append(head_eigenvalues(result.table, selected, args.plot))
        console.print(f"wrote {len(paths)} figures to {args.plot}")
    return 0


def cmd_metrics(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    from .metrics import all_metrics

    config = Config.from_file(args.config) if args.config else Config()
    table = Table(title="metrics (groups: stats, spectral, all)", title_justify="left")
    for col in ("name", "group", "needs", "what"):
        table.add_column(col)
    for m in all_metrics(config).values():
        table.add_row(m.name, m.group, m.needs, m.doc)
    console.print(table)
    return 0


COMMANDS = {"info": cmd_info, "analyze": cmd_analyze, "heads": cmd_heads, "metrics": cmd_metrics}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="layerscope: %(message)s")
    console = Console()
    try:
        return COMMANDS[args.command](args, console)
    except LayerscopeError as exc:
        print(f"layerscope: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layerscope: interrupted; results computed so far are in the store, run again to resume", file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)  # do not wait for worker threads still inside a decomposition
    except Exception as exc:  # a bug of ours: still one line, traceback on request
        if os.environ.get("LAYERSCOPE_DEBUG"):
            raise
        print(f"layerscope: internal error: {type(exc).__name__}: {exc} (set LAYERSCOPE_DEBUG=1 for a traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
