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
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from rich.console import Console

from . import __version__
from .config import Config
from .errors import LayerscopeError
from .views import ProgressDisplay


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint file or folder, or a Hugging Face hub repo id (org/name)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) to pin")


def _add_store(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="SQLite result store (default: the user cache directory)")
    p.add_argument("--no-cache", action="store_true", help="recompute instead of reading the store")
    p.add_argument("--config", help="JSON, TOML or YAML file with Config keys; flags override it")


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
    _add_store(hd)

    em = sub.add_parser("embeddings", help="exact all-pairs cosine geometry of the token embedding (and untied lm_head)")
    _add_common(em)
    em.add_argument("--out", help="write the results as JSON")
    em.add_argument("--plot", help="folder for the cosine histogram")
    em.add_argument("--threshold", type=float, default=0.7, help="cosine above which two tokens are neighbours (default 0.7)")
    em.add_argument("--tokens", help="comma-separated tokens whose nearest neighbours to list, e.g. 'the,king,def'")
    em.add_argument("--sample", type=int, help="estimate from this many random pairs instead of all pairs")
    em.add_argument("--max-memory", default="1GB", help="memory for the block of cosines in flight (e.g. 512MB, 2GB)")
    em.add_argument("--bins", type=int, default=100, help="histogram bins over --range (default 100)")
    em.add_argument("--range", default="-0.5,1.0", help="histogram range LOW,HIGH (default -0.5,1.0)")
    em.add_argument("--precision", choices=["float32", "float64"], default="float32",
                    help="GEMM precision (float64: every count exact against a float64 reference; ~2x slower)")
    em.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    _add_store(em)

    cl = sub.add_parser("clusters", help="k-means clusters of the token embedding, decoded to text")
    _add_common(cl)
    cl.add_argument("--k-range", default="2..64", help="range of k, searched on a log grid (default 2..64)")
    cl.add_argument("--k-values", help="explicit comma-separated k values instead of --k-range")
    cl.add_argument("--select-by", default="silhouette", choices=["calinski_harabasz", "silhouette", "elbow"],
                    help="how k is chosen (default silhouette, on a seeded sample of 5000 rows)")
    cl.add_argument("--matrix", default="embed.token", choices=["embed.token", "embed.position", "lm_head"],
                    help="which matrix to cluster (position embeddings are always clustered on their own)")
    cl.add_argument("--out", help="write the clusters as JSON")
    cl.add_argument("--plot", help="folder for the k-selection curve")
    cl.add_argument("--seed", type=int, help="random seed (default 0)")
    _add_store(cl)

    cp = sub.add_parser("compare", help="drift between checkpoints: per matrix, spectral deltas, tokens, task vectors")
    cp.add_argument("paths", nargs="+", metavar="PATH", help="two checkpoints A B (drift A → B), or fine-tunes with --base")
    cp.add_argument("--base", help="base model: drift base → each PATH, plus task vectors (PATH − base) and sign conflicts")
    cp.add_argument("--out", help="write the drift table to .csv/.parquet, or everything to .json")
    cp.add_argument("--plot", help="folder for drift-by-layer figures")
    cp.add_argument("--top-k", type=int, default=50, help="most and least drifted tokens to list (default 50)")
    cp.add_argument("--no-procrustes", action="store_true", help="skip the Procrustes alignment (faster on big models)")
    cp.add_argument("--no-spectral", action="store_true", help="skip the spectral deltas (no analysis of either model)")
    cp.add_argument("--trim", type=float, default=0.2, help="TIES trim: sign conflicts also among the top fraction by magnitude (default 0.2)")
    _add_store(cp)

    tr = sub.add_parser("trajectory", help="every metric over the checkpoints of a training run, and drift")
    tr.add_argument("paths", nargs="+", metavar="PATH",
                    help="a folder of checkpoints (checkpoint-<step>/, ckpt_<iter>.pt, ...) or the checkpoints themselves")
    tr.add_argument("--out", help="write the long table (step × matrix) to .csv, .parquet or .json")
    tr.add_argument("--plot", help="folder for metric-over-steps figures")
    tr.add_argument("--plot-metrics", default="entropy_rank,stable_rank,alpha,drift_first_rel_change",
                    help="columns to plot over steps (default entropy_rank,stable_rank,alpha,drift_first_rel_change)")
    tr.add_argument("--metrics", help="metrics to compute (names or groups; default all)")
    tr.add_argument("--procrustes", action="store_true", help="also the Procrustes-aligned cosine of each step's drift")
    _add_store(tr)

    rp = sub.add_parser("report", help="one self-contained HTML report (and Markdown) of one or more models")
    rp.add_argument("paths", nargs="+", metavar="PATH", help="checkpoints; several give a side-by-side comparison")
    rp.add_argument("--out", default="layerscope-report/report.html", help="HTML file (default layerscope-report/report.html)")
    rp.add_argument("--md", help="also write Markdown here, with its PNGs in a folder beside it")
    rp.add_argument("--embeddings", action="store_true", help="compute the embedding geometry if not stored yet")
    rp.add_argument("--clusters", action="store_true", help="compute the token clusters if not stored yet")
    _add_store(rp)

    rn = sub.add_parser("run", help="the whole analysis (info, analyze, heads, embeddings, clusters) and the report")
    _add_common(rn)
    rn.add_argument("--out", default="layerscope-out", help="output folder (default layerscope-out)")
    rn.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    rn.add_argument("--skip", default="", help="comma-separated stages to leave out: embeddings, clusters, probe")
    _add_store(rn)

    pr = sub.add_parser("probe", help="run the model on data: loss, and Hessian curvature with --hessian")
    _add_common(pr)
    pr.add_argument("--data", help="text file, folder of .txt, .jsonl, .parquet or a datasets save_to_disk folder "
                                   "(default: the Python reference's help topics, see README)")
    pr.add_argument("--text-field", help="field/column holding the text in .jsonl, .parquet and datasets (default text)")
    pr.add_argument("--seq-len", type=int, help="tokens per window (default min(128, the model's positions))")
    pr.add_argument("--batches", type=int, default=4, help="batches (default 4)")
    pr.add_argument("--batch-size", type=int, default=8, help="windows per batch (default 8)")
    pr.add_argument("--seed", type=int, help="seed for the windows drawn, masking and random vectors (default 0)")
    pr.add_argument("--device", help="cpu, cuda, cuda:N or auto (no CUDA: the CPU)")
    pr.add_argument("--dtype", choices=["float32", "float64", "bfloat16", "float16"], help="model precision (default float32)")
    pr.add_argument("--hessian", action="store_true", help="Hessian: top-k and min eigenvalues, trace, density, per block")
    pr.add_argument("--top-k", type=int, default=5, help="Hessian eigenvalues to report (default 5)")
    pr.add_argument("--tol", type=float, default=1e-4, help="Lanczos stop: Ritz residual ≤ tol·max|θ| (default 1e-4)")
    pr.add_argument("--max-iter", type=int, default=100, help="Lanczos steps at most (default 100)")
    pr.add_argument("--trace-samples", type=int, default=100, help="Hutchinson samples at most (default 100)")
    pr.add_argument("--trace-rel-error", type=float, default=0.05, help="stop the trace at this s.e./|trace| (default 0.05; 0: fixed budget)")
    pr.add_argument("--density-runs", type=int, default=4, help="SLQ runs (default 4)")
    pr.add_argument("--density-steps", type=int, default=40, help="Lanczos steps per SLQ run (default 40)")
    pr.add_argument("--blocks", default="layer,type", help="block families for per-block curvature: layer, type, or none")
    pr.add_argument("--out", help="write everything as JSON")
    pr.add_argument("--plot", help="folder for the density and per-layer curvature figures")
    _add_store(pr)
    from .probes import gradients as _gradients

    _gradients.add_arguments(pr)

    ls = sub.add_parser("landscape", help="loss landscape: 1-D between two checkpoints (barrier), 2-D around one or through three")
    ls.add_argument("paths", nargs="+", metavar="PATH",
                    help="one checkpoint (2-D around it), two (1-D interpolation A→B) or three (the plane through them)")
    ls.add_argument("--directions", default="random", choices=["random", "hessian"],
                    help="2-D around one checkpoint: filter-normalised Gaussian (random) or top-2 Hessian eigenvectors")
    ls.add_argument("--grid", type=int, default=25, help="grid points per axis (2-D; odd around one checkpoint; default 25)")
    ls.add_argument("--span", type=float, default=1.0, help="2-D around one checkpoint: coordinates from -span to span (default 1.0)")
    ls.add_argument("--points", type=int, default=21, help="1-D: points from α=0 to α=1 (default 21)")
    ls.add_argument("--extend", type=float, default=0.0, help="1-D: also this far past both ends, e.g. 0.5 (default 0)")
    ls.add_argument("--pad", type=float, default=0.2, help="plane: margin around the three checkpoints, share of the box (default 0.2)")
    ls.add_argument("--points-per-forward", type=int, help="points stacked per forward (default: from a memory budget)")
    ls.add_argument("--data", help="text file, folder of .txt, .jsonl, .parquet or datasets folder (default: the Python reference's help topics)")
    ls.add_argument("--text-field", help="field/column holding the text (default text)")
    ls.add_argument("--seq-len", type=int, help="tokens per window (default min(128, the model's positions))")
    ls.add_argument("--batches", type=int, default=4, help="batches (default 4)")
    ls.add_argument("--batch-size", type=int, default=8, help="windows per batch (default 8)")
    ls.add_argument("--seed", type=int, default=0, help="seed of the random directions (default 0)")
    ls.add_argument("--data-seed", type=int, default=0, help="seed of the windows drawn (default 0)")
    ls.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    ls.add_argument("--dtype", choices=["float32", "float64", "bfloat16", "float16"], help="model precision (default float32)")
    ls.add_argument("--out", help="write the points and summary to .json, or the points to .csv/.parquet")
    ls.add_argument("--plot", help="folder for the contour, surface or line figures")
    _add_store(ls)

    ms = sub.add_parser("metrics", help="list the available metrics")
    ms.add_argument("--config", help="config file (energy levels change the metric names)")
    return parser


def _config(args: argparse.Namespace) -> Config:
    config = Config.from_file(args.config) if getattr(args, "config", None) else Config()
    overrides: dict[str, Any] = {}
    for flag, key in (("metrics", "metrics"), ("device", "device"), ("workers", "workers"), ("dtype", "dtype"),
                      ("store", "store"), ("seed", "seed")):
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
    from .weights.metrics import select_metrics
    from .pipeline import analyze
    from .views import print_summary, write_table

    config = _config(args)
    select_metrics(config)  # reject unknown metric names before any work
    err = Console(stderr=True)
    with ProgressDisplay("analyzing", quiet=args.quiet) as progress:
        result = analyze(args.path, config, revision=args.revision,
                         progress=lambda done, total, name: progress.update("tensors", done, total, name))
    if not args.quiet:
        print_summary(result, console)
    if args.out:
        path = write_table(result.table, args.out)
        console.print(f"wrote {len(result.table)} rows to {path}")
    if args.plot and (result.table["role"] == "mlp.down").any():
        from .weights.mlp import mlp_down_spectra
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
    from .weights.heads import heads
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


def parse_bytes(text: str) -> int:
    units = {"kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "b": 1, "": 1}
    t = text.strip().lower()
    number = t.rstrip("kmgb")
    try:
        value = int(float(number) * units[t[len(number):]])
    except (ValueError, KeyError):
        raise LayerscopeError(f"--max-memory: expected a size such as 512MB or 2GB, got {text!r}") from None
    if value < 1 << 20:
        raise LayerscopeError(f"--max-memory: at least 1MB, got {text!r}")
    return value


def cmd_embeddings(args: argparse.Namespace, console: Console) -> int:
    from .weights.embeddings import GeometryOptions, embeddings
    from .views import print_embeddings

    config = _config(args)
    try:
        lo, hi = (float(v) for v in args.range.split(","))
    except ValueError:
        raise LayerscopeError(f"--range: expected LOW,HIGH such as -0.5,1.0, got {args.range!r}") from None
    if not lo < hi or args.bins < 1:
        raise LayerscopeError("--range must have LOW < HIGH and --bins must be >= 1")
    if args.sample is not None and args.sample < 2:
        raise LayerscopeError("--sample must be at least 2")
    options = GeometryOptions(threshold=args.threshold, bins=args.bins, lo=lo, hi=hi, precision=args.precision,
                              max_memory=parse_bytes(args.max_memory), sample=args.sample, seed=config.seed)
    tokens = [t.strip() for t in args.tokens.split(",") if t.strip()] if args.tokens else None
    with ProgressDisplay("cosine blocks") as progress:
        result = embeddings(args.path, config, options=options, tokens=tokens, revision=args.revision,
                            progress=progress.update)
    print_embeddings(result, console)
    if args.out:
        console.print(f"wrote {result.save(args.out)}")
    if args.plot:
        from .plots import cosine_histogram

        for role, geometry in result.matrices.items():
            if "histogram" in geometry:
                console.print(f"wrote {cosine_histogram(geometry, args.plot, role)}")
    return 0


def cmd_clusters(args: argparse.Namespace, console: Console) -> int:
    from .weights.clusters import clusters, parse_k_range
    from .views import print_clusters

    config = _config(args)
    k_values = None
    if args.k_values:
        try:
            k_values = [int(k) for k in args.k_values.split(",") if k.strip()]
        except ValueError:
            raise LayerscopeError(f"--k-values: expected integers, got {args.k_values!r}") from None
        if any(k < 2 for k in k_values):
            raise LayerscopeError("--k-values: every k must be >= 2")
    with ProgressDisplay("k-means") as progress:
        result = clusters(args.path, config, k_range=parse_k_range(args.k_range), k_values=k_values,
                          roles=(args.matrix,), selection=args.select_by, revision=args.revision,
                          progress=progress.update)
    print_clusters(result, console)
    if args.out:
        console.print(f"wrote {result.save(args.out)}")
    if args.plot:
        from .plots import selection_curve

        for role, res in result.matrices.items():
            console.print(f"wrote {selection_curve(pd.DataFrame(res['scores']), res['chosen_k'], args.plot, role)}")
    return 0


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    from .change.compare import compare
    from .views import print_compare

    with ProgressDisplay("comparing") as progress:
        result = compare(*args.paths, base=args.base, config=_config(args), top_k=args.top_k, procrustes=not args.no_procrustes,
                         spectral=not args.no_spectral, keep=args.trim,
                         progress=lambda done, total, name: progress.update("tensors", done, total, name))
    print_compare(result, console)
    if args.out:
        console.print(f"wrote {result.save(args.out)}")
    if args.plot:
        from .plots import drift_by_layer

        for label in result.models:
            rows = result.table[result.table["model"] == label]
            console.print(f"wrote {drift_by_layer(rows, Path(args.plot) / label, f'drift {result.reference} → {label}')}")
    return 1 if any(result.table["error"].astype(str).str.startswith("unreadable")) else 0


def cmd_trajectory(args: argparse.Namespace, console: Console) -> int:
    from .change.trajectory import trajectory
    from .views import print_trajectory

    with ProgressDisplay("trajectory") as progress:
        result = trajectory(args.paths, _config(args), procrustes=args.procrustes, progress=progress.update)
    print_trajectory(result, console)
    if args.out:
        console.print(f"wrote {result.save(args.out)}")
    if args.plot:
        from .plots import metric_over_steps

        for metric in (m.strip() for m in args.plot_metrics.split(",") if m.strip()):
            if metric not in result.table.columns:
                raise LayerscopeError(f"--plot-metrics: no column {metric!r} (columns: {', '.join(result.table.columns[6:])})")
            console.print(f"wrote {metric_over_steps(result.table, metric, args.plot)}")
    return 1 if result.skipped else 0


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from .report import report

    with ProgressDisplay("report") as progress:
        result = report(args.paths, _config(args), out=args.out, markdown=args.md,
                        embeddings=True if args.embeddings else None, clusters=True if args.clusters else None,
                        progress=progress.update)
    console.print(f"wrote {result.html}" + (f" and {result.markdown}" if result.markdown else "")
                  + f" in {result.seconds:.1f} s")
    return 1 if any(m.analysis.unreadable for m in result.models) else 0


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from .run import run

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - {"embeddings", "clusters", "probe"}
    if unknown:
        raise LayerscopeError(f"--skip: unknown stage(s) {', '.join(sorted(unknown))} (known: embeddings, clusters, probe)")
    result = run(args.path, _config(args), out=args.out, revision=args.revision, skip=skip, console=console)
    stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.stage_seconds.items())
    console.print(f"[bold]report:[/bold] {result.html}  (Markdown: {result.markdown}; {result.seconds:.1f} s in all: {stages})")
    return 1 if any(m.analysis.unreadable for m in result.models) else 0


def cmd_probe(args: argparse.Namespace, console: Console) -> int:
    from .probes.curvature import HessianOptions
    from .probes.probe import print_probe, probe

    config = _config(args)
    hessian: Any = False
    if args.hessian:
        blocks = tuple(b.strip() for b in args.blocks.split(",") if b.strip() and b.strip() != "none")
        hessian = HessianOptions(top_k=args.top_k, tol=args.tol, max_iter=args.max_iter,
                                 trace_max=args.trace_samples, trace_min=min(10, args.trace_samples),
                                 trace_rel_error=args.trace_rel_error or None, density_runs=args.density_runs,
                                 density_steps=args.density_steps, blocks=blocks, seed=config.seed)
    if args.out and not args.out.lower().endswith(".json"):
        raise LayerscopeError(f"--out must be a .json file, got {args.out}")
    from .probes.gradients import from_args as gradient_options

    gradients = gradient_options(args) or False
    with ProgressDisplay("probe") as progress:
        result = probe(args.path, args.data, hessian=hessian, gradients=gradients, text_field=args.text_field, seq_len=args.seq_len,
                       batches=args.batches, batch_size=args.batch_size, seed=config.seed, device=args.device,
                       dtype=args.dtype, config=config, revision=args.revision, progress=progress.update)
    print_probe(result, console)
    if args.out:
        console.print(f"wrote {result.save(args.out)}")
    if args.plot and result.hessian is not None:
        from .probes.figures import block_curvature, hessian_density

        h = result.hessian
        paths = [hessian_density(h.density, args.plot, result.model.label.rsplit("/", 1)[-1],
                                 top=float(h.eigenvalues["eigenvalue"].iloc[0]), bottom=h.bottom["eigenvalue"])]
        if len(h.blocks) and (h.blocks["kind"] == "layer").any():
            paths.append(block_curvature(h.blocks, args.plot, result.model.label.rsplit("/", 1)[-1]))
        console.print(f"wrote {len(paths)} figures to {args.plot}")
    return 0


def cmd_landscape(args: argparse.Namespace, console: Console) -> int:
    from .probes.landscape import landscape, print_landscape

    config = _config(args)
    with ProgressDisplay("landscape") as progress:
        result = landscape(args.paths, args.data, directions=args.directions, grid=args.grid, span=args.span,
                           points=args.points, extend=args.extend, pad=args.pad, seed=args.seed,
                           points_per_forward=args.points_per_forward, device=args.device or config.device,
                           dtype=args.dtype, seq_len=args.seq_len, batches=args.batches, batch_size=args.batch_size,
                           data_seed=args.data_seed, text_field=args.text_field, store=config.resolved_store(),
                           cache=config.cache, progress=progress.update)
    print_landscape(result, console)
    if args.out:
        console.print(f"wrote {result.save(args.out)}")
    if args.plot:
        paths = result.plot(args.plot)
        console.print(f"wrote {len(paths)} figures to {args.plot}")
    return 0


def cmd_metrics(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    from .weights.metrics import all_metrics

    config = Config.from_file(args.config) if args.config else Config()
    table = Table(title="metrics (groups: stats, spectral, all)", title_justify="left")
    for col in ("name", "group", "needs", "what"):
        table.add_column(col)
    for m in all_metrics(config).values():
        table.add_row(m.name, m.group, m.needs, m.doc)
    console.print(table)
    return 0


COMMANDS = {"info": cmd_info, "analyze": cmd_analyze, "heads": cmd_heads, "embeddings": cmd_embeddings,
            "clusters": cmd_clusters, "compare": cmd_compare, "trajectory": cmd_trajectory, "report": cmd_report, "run": cmd_run, "probe": cmd_probe, "landscape": cmd_landscape,
            "metrics": cmd_metrics}


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
