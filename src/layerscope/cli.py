"""``layerscope`` command line: thin wrappers that build a Config, call the pipeline, pick a view.

Bad input is one line on stderr and exit status 2, found before any work starts (cli_args: argparse
types for single flags, ``preflight`` and a per-subcommand ``check`` for the rest); a run where some
tensor could not be read exits 1 after writing everything else; Ctrl-C exits 130 with the store intact.

Start-up time: this module imports nothing heavy at top level (no torch, pandas, rich tables,
matplotlib, scikit-learn). Each ``cmd_*`` imports what it uses, so ``--help`` answers at once and
``info`` never loads the plotting or clustering stacks. tests/test_startup.py checks this.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from . import __version__
from .cli_args import (TABLE_SUFFIXES, Parser, checkpoint, comma_list, device, existing_file, float_between,
                       int_at_least, output_file, output_folder, preflight, store_file)
from .config import Config
from .errors import LayerscopeError
from .probes.fisher_cli import add_fisher_arguments, add_merge_command

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=checkpoint, help="checkpoint file or folder, or a Hugging Face hub repo id (gpt2, org/name)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) to pin")


def _add_store(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=store_file, help="SQLite result store (default: the user cache directory)")
    p.add_argument("--no-cache", action="store_true", help="recompute instead of reading the store")
    p.add_argument("--config", type=existing_file, help="JSON, TOML or YAML file with Config keys; flags override it")


PLOT_METRICS_DEFAULT = "entropy_rank,stable_rank,alpha,drift_first_rel_change"
_comma = comma_list()


def _add_cluster(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", metavar="ray|ray://HOST:PORT",
                   help="run the independent pieces on a Ray cluster: 'ray' starts or joins a local instance "
                        "(RAY_ADDRESS honoured), 'ray://HOST:PORT' joins an existing one (needs layerscope[ray])")


UNTRAINED_HELP = ("leave out embedding rows that look untrained ([unused…] and reserved tokens, and rows as close "
                  "to those as they are to each other; see the README)")


DATA_HELP = ("text file, folder of .txt, .jsonl, .parquet or a datasets save_to_disk folder "
             "(default: the Python reference's help topics, see README)")


def _add_data(p: argparse.ArgumentParser, data_help: str = DATA_HELP, data_action: str = "store") -> None:
    """The flags every command that runs the model on text shares: data, windows, device, dtype."""
    p.add_argument("--data", action=data_action, help=data_help)
    p.add_argument("--text-field", help="field/column holding the text in .jsonl, .parquet and datasets (default text)")
    p.add_argument("--seq-len", type=int_at_least(2), help="tokens per window (default min(128, the model's positions))")
    p.add_argument("--batches", type=int_at_least(1), default=4, help="batches (default 4)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="windows per batch (default 8)")
    p.add_argument("--device", type=device, help="cpu, cuda, cuda:N or auto (no CUDA: the CPU)")
    # dest model_dtype: the model's precision, not Config.dtype (the spectrum's, which _config reads from args.dtype)
    p.add_argument("--dtype", dest="model_dtype", choices=["float32", "float64", "bfloat16", "float16"],
                   help="model precision (default float32)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="layerscope", description="See inside a transformer's weights. "
                                                   "'layerscope PATH' is short for 'layerscope info PATH'.")
    parser.add_argument("--version", action="version", version=f"layerscope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="the anatomy: family, dims, parameters, tensors by role")
    _add_common(info)
    info.add_argument("--json", action="store_true", help="print the anatomy as JSON")

    an = sub.add_parser("analyze", help="statistics and spectral metrics of every matrix")
    _add_common(an)
    an.add_argument("--metrics", help="comma-separated metric or group names (stats, spectral, all); see 'layerscope metrics'")
    an.add_argument("--out", type=output_file(*TABLE_SUFFIXES), help="write the full table to .csv, .parquet or .json")
    an.add_argument("--device", type=device, help="cpu, cuda, cuda:N or auto (CUDA out-of-memory falls back to the CPU)")
    an.add_argument("--workers", type=int_at_least(0), help="tensors analysed at once (default: one per core, at most 4)")
    an.add_argument("--dtype", choices=["float64", "float32"], help="spectrum precision (default float64)")
    an.add_argument("--store", type=store_file, help="SQLite result store (default: the user cache directory)")
    an.add_argument("--no-cache", action="store_true", help="recompute everything instead of reading the store")
    an.add_argument("--no-slices", action="store_true", help="do not analyse q/k/v slices of fused matrices and MoE experts separately")
    an.add_argument("--config", type=existing_file, help="JSON, TOML or YAML file with Config keys; flags override it")
    an.add_argument("--plot", type=output_folder, help="folder for figures (MLP down-projection explained-variance curves)")
    an.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    _add_cluster(an)

    hd = sub.add_parser("heads", help="QK and OV circuits of every attention head (factored, GQA aware)")
    _add_common(hd)
    hd.add_argument("--out", type=output_file(*TABLE_SUFFIXES),
                    help="write the per-head table to .csv, .parquet or .json (JSON keeps the top eigenvalues)")
    hd.add_argument("--plot", type=output_folder, help="folder for layer × head heatmaps and eigenvalue plots")
    hd.add_argument("--select", type=_parse_heads, help="heads to plot eigenvalues of, as LAYER.HEAD list (default: most and least copying)")
    _add_store(hd)

    em = sub.add_parser("embeddings", help="exact all-pairs cosine geometry of the token embedding (and untied lm_head)")
    _add_common(em)
    em.add_argument("--out", type=output_file(".json"), help="write the results as JSON")
    em.add_argument("--plot", type=output_folder, help="folder for the cosine histogram")
    em.add_argument("--threshold", type=float_between(-1, 1), default=0.7,
                    help="cosine above which two tokens are neighbours (default 0.7)")
    em.add_argument("--tokens", help="comma-separated tokens whose nearest neighbours to list, e.g. 'the,king,def'")
    em.add_argument("--sample", type=int_at_least(2), help="estimate from this many random pairs instead of all pairs")
    em.add_argument("--max-memory", type=parse_bytes, default="1GB",
                    help="memory for the block of cosines in flight (e.g. 512MB, 2GB)")
    em.add_argument("--bins", type=int_at_least(1), default=100, help="histogram bins over --range (default 100)")
    em.add_argument("--range", type=_parse_range, default="-0.5,1.0", help="histogram range LOW,HIGH (default -0.5,1.0)")
    em.add_argument("--precision", choices=["float32", "float64"], default="float32",
                    help="GEMM precision (float64: every count exact against a float64 reference; ~2x slower)")
    em.add_argument("--exclude-untrained", action="store_true", help=UNTRAINED_HELP)
    em.add_argument("--device", type=device, help="cpu, cuda, cuda:N or auto")
    _add_store(em)

    cl = sub.add_parser("clusters", help="k-means clusters of the token embedding, decoded to text")
    _add_common(cl)
    cl.add_argument("--k-range", type=_parse_k_range, default="2..64", help="range of k, searched on a log grid (default 2..64)")
    cl.add_argument("--k-values", type=_parse_k_values, help="explicit comma-separated k values instead of --k-range")
    cl.add_argument("--select-by", default="silhouette", choices=["calinski_harabasz", "silhouette", "elbow"],
                    help="how k is chosen (default silhouette, on a seeded sample of 5000 rows)")
    cl.add_argument("--matrix", default="embed.token", choices=["embed.token", "embed.position", "lm_head"],
                    help="which matrix to cluster (position embeddings are always clustered on their own)")
    cl.add_argument("--out", type=output_file(".json"), help="write the clusters as JSON")
    cl.add_argument("--plot", type=output_folder, help="folder for the k-selection curve")
    cl.add_argument("--seed", type=int, help="random seed (default 0)")
    cl.add_argument("--exclude-untrained", action="store_true", help=UNTRAINED_HELP)
    _add_store(cl)

    cp = sub.add_parser("compare", help="drift between checkpoints: per matrix, spectral deltas, tokens, task vectors")
    cp.add_argument("paths", nargs="+", type=checkpoint, metavar="PATH",
                    help="two checkpoints A B (drift A → B), or fine-tunes with --base")
    cp.add_argument("--base", type=checkpoint, help="base model: drift base → each PATH, plus task vectors (PATH − base) and sign conflicts")
    cp.add_argument("--out", type=output_file(*TABLE_SUFFIXES), help="write the drift table to .csv/.parquet, or everything to .json")
    cp.add_argument("--plot", type=output_folder, help="folder for drift-by-layer figures")
    cp.add_argument("--top-k", type=int_at_least(0), default=50, help="most and least drifted tokens to list (default 50)")
    cp.add_argument("--no-procrustes", action="store_true", help="skip the Procrustes alignment (faster on big models)")
    cp.add_argument("--no-spectral", action="store_true", help="skip the spectral deltas (no analysis of either model)")
    cp.add_argument("--trim", type=float_between(0, 1), default=0.2,
                    help="TIES trim: sign conflicts also among the top fraction by magnitude (default 0.2)")
    g = cp.add_argument_group("CKA on data (--data): debiased linear CKA between the same layer of A and B on the same tokens")
    _add_data(g, "text to run both models on (" + DATA_HELP.split(" (")[0] + "); adds the per-layer cka column")
    g.add_argument("--seed", type=int, help="seed for the windows drawn (default 0)")
    _add_store(cp)
    _add_cluster(cp)
    cp.set_defaults(check=_check_compare)

    tr = sub.add_parser("trajectory", help="every metric over the checkpoints of a training run, and drift")
    tr.add_argument("paths", nargs="+", type=checkpoint, metavar="PATH",
                    help="a folder of checkpoints (checkpoint-<step>/, ckpt_<iter>.pt, ...) or the checkpoints themselves")
    tr.add_argument("--out", type=output_file(*TABLE_SUFFIXES), help="write the long table (step × matrix) to .csv, .parquet or .json")
    tr.add_argument("--plot", type=output_folder, help="folder for metric-over-steps figures")
    tr.add_argument("--plot-metrics", type=_comma, default=PLOT_METRICS_DEFAULT,
                    help=f"columns to plot over steps (default {PLOT_METRICS_DEFAULT})")
    tr.add_argument("--metrics", help="metrics to compute (names or groups; default all)")
    tr.add_argument("--procrustes", action="store_true", help="also the Procrustes-aligned cosine of each step's drift")
    _add_store(tr)
    _add_cluster(tr)
    tr.set_defaults(check=_check_trajectory)

    rp = sub.add_parser("report", help="one self-contained HTML report (and Markdown) of one or more models")
    rp.add_argument("paths", nargs="+", type=checkpoint, metavar="PATH", help="checkpoints; several give a side-by-side comparison")
    rp.add_argument("--out", type=output_file(".html", ".htm"), default="layerscope-report/report.html",
                    help="HTML file (default layerscope-report/report.html)")
    rp.add_argument("--md", type=output_file(".md"), help="also write Markdown here, with its PNGs in a folder beside it")
    rp.add_argument("--embeddings", action="store_true", help="compute the embedding geometry if not stored yet")
    rp.add_argument("--clusters", action="store_true", help="compute the token clusters if not stored yet")
    _add_store(rp)
    _add_cluster(rp)

    rn = sub.add_parser("run", help="the whole analysis (info, analyze, heads, embeddings, clusters) and the report")
    _add_common(rn)
    rn.add_argument("--out", type=output_folder, default="layerscope-out", help="output folder (default layerscope-out)")
    rn.add_argument("--device", type=device, help="cpu, cuda, cuda:N or auto")
    rn.add_argument("--skip", type=comma_list(("embeddings", "clusters", "probe", "activations")), default="",
                    help="comma-separated stages to leave out: embeddings, clusters, probe, activations")
    rn.add_argument("--exclude-untrained", action="store_true", help=UNTRAINED_HELP)
    _add_store(rn)
    _add_cluster(rn)

    pr = sub.add_parser("probe", help="run the model on data: loss, and Hessian curvature with --hessian")
    _add_common(pr)
    _add_data(pr, DATA_HELP + "; again for more datasets, compared with the first by Fisher overlap", "append")
    pr.add_argument("--seed", type=int, help="seed for the windows drawn, masking and random vectors (default 0)")
    pr.add_argument("--hessian", action="store_true", help="Hessian: top-k and min eigenvalues, trace, density, per block")
    pr.add_argument("--top-k", type=int_at_least(1), default=5, help="Hessian eigenvalues to report (default 5)")
    pr.add_argument("--tol", type=float_between(0, 1), default=1e-4, help="Lanczos stop: Ritz residual ≤ tol·max|θ| (default 1e-4)")
    pr.add_argument("--max-iter", type=int_at_least(1), default=100, help="Lanczos steps at most (default 100)")
    pr.add_argument("--trace-samples", type=int_at_least(1), default=100, help="Hutchinson samples at most (default 100)")
    pr.add_argument("--trace-rel-error", type=float_between(0, 1), default=0.05, help="stop the trace at this s.e./|trace| (default 0.05; 0: fixed budget)")
    pr.add_argument("--density-runs", type=int_at_least(1), default=4, help="SLQ runs (default 4)")
    pr.add_argument("--density-steps", type=int_at_least(2), default=40, help="Lanczos steps per SLQ run (default 40)")
    pr.add_argument("--blocks", default="layer,type", help="block families for per-block curvature: layer, type, or none")
    pr.add_argument("--out", type=output_file(".json"), help="write everything as JSON")
    pr.add_argument("--plot", type=output_folder, help="folder for the density, per-layer curvature, Fisher and pruning figures")
    add_fisher_arguments(pr)
    _add_store(pr)
    g = pr.add_argument_group("gradient health (--gradients)")
    g.add_argument("--gradients", action="store_true", help="gradient norms, noise scale, SNR, flags, dead MLP neurons")
    g.add_argument("--no-per-example", action="store_true",
                   help="gradient health without per-example gradients (two-batch noise scale only; no GSNR)")
    g.add_argument("--activity-threshold", type=float, default=0.0,
                   help="an MLP neuron is active on a token when its activation is above this (default 0)")

    ls = sub.add_parser("landscape", help="loss landscape: 1-D between two checkpoints (barrier), 2-D around one or through three")
    ls.add_argument("paths", nargs="+", type=checkpoint, metavar="PATH",
                    help="one checkpoint (2-D around it), two (1-D interpolation A→B) or three (the plane through them)")
    ls.add_argument("--directions", default="random", choices=["random", "hessian"],
                    help="2-D around one checkpoint: filter-normalised Gaussian (random) or top-2 Hessian eigenvectors")
    ls.add_argument("--grid", type=int_at_least(2), default=25, help="grid points per axis (2-D; odd around one checkpoint; default 25)")
    ls.add_argument("--span", type=float, default=1.0, help="2-D around one checkpoint: coordinates from -span to span (default 1.0)")
    ls.add_argument("--points", type=int_at_least(2), default=21, help="1-D: points from α=0 to α=1 (default 21)")
    ls.add_argument("--extend", type=float, default=0.0, help="1-D: also this far past both ends, e.g. 0.5 (default 0)")
    ls.add_argument("--pad", type=float, default=0.2, help="plane: margin around the three checkpoints, share of the box (default 0.2)")
    ls.add_argument("--points-per-forward", type=int_at_least(1), help="points stacked per forward (default: from a memory budget)")
    _add_data(ls)
    ls.add_argument("--seed", type=int, default=0, help="seed of the random directions (default 0)")
    ls.add_argument("--data-seed", type=int, default=0, help="seed of the windows drawn (default 0)")
    ls.add_argument("--out", type=output_file(*TABLE_SUFFIXES), help="write the points and summary to .json, or the points to .csv/.parquet")
    ls.add_argument("--plot", type=output_folder, help="folder for the contour, surface or line figures")
    _add_store(ls)

    add_merge_command(sub)

    ac = sub.add_parser("activations", help="what the model does on text: head behaviour, logit lens, CKA, neurons")
    _add_common(ac)
    _add_data(ac)
    ac.add_argument("--seed", type=int, help="seed for the windows, the CKA sample and the random tokens (default 0)")
    ac.add_argument("--other", type=checkpoint, help="a second checkpoint (same architecture and tokenizer): per-layer CKA with it")
    ac.add_argument("--cka-tokens", type=int_at_least(4), default=512, help="token positions sampled for CKA (default 512)")
    ac.add_argument("--neuron-threshold", type=float, default=0.0, help="a neuron is active when its activation > this (default 0)")
    ac.add_argument("--out", type=output_file(".json"), help="write everything as JSON")
    ac.add_argument("--plot", type=output_folder, help="folder for head-behaviour heatmaps, the lens and CKA figures")
    _add_store(ac)

    ms = sub.add_parser("metrics", help="list the available metrics")
    ms.add_argument("--config", type=existing_file, help="config file (energy levels change the metric names)")
    return parser


def _config(args: argparse.Namespace) -> Config:
    config = Config.from_file(args.config) if getattr(args, "config", None) else Config()
    overrides: dict[str, Any] = {}
    for flag, key in (("metrics", "metrics"), ("device", "device"), ("workers", "workers"), ("dtype", "dtype"),
                      ("store", "store"), ("seed", "seed"), ("cluster", "cluster")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    if getattr(args, "no_cache", False):
        overrides["cache"] = False
    if getattr(args, "no_slices", False):
        overrides["slices"] = False
    return config.replace(**overrides)


def cmd_info(args: argparse.Namespace, console: "Console") -> int:
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


def cmd_analyze(args: argparse.Namespace, console: "Console") -> int:
    from rich.console import Console

    from .pipeline import analyze
    from .views import ProgressDisplay, print_summary, write_table

    config = _config(args)
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
        raise argparse.ArgumentTypeError(f"expected LAYER.HEAD items such as 0.3,5.11, got {text!r}") from None


def cmd_heads(args: argparse.Namespace, console: "Console") -> int:
    from .weights.heads import heads
    from .views import print_heads

    config = _config(args)
    selected = args.select
    result = heads(args.path, config, revision=args.revision)
    print_heads(result, console)
    if args.out:
        result.save(args.out)
        console.print(f"wrote {len(result.table)} heads to {args.out}")
    if args.plot:
        import pandas as pd

        from .plots import head_eigenvalues, head_heatmaps

        paths = head_heatmaps(result.table, args.plot, title=result.source.display_name,
                              head_dim=result.anatomy.dims.head_dim)
        if selected is None:
            ranked = result.table.sort_values("ov_copying_score")
            selected = [(int(r.layer), int(r.head)) for r in pd.concat([ranked.head(3), ranked.tail(3)]).itertuples()]
        paths.append(head_eigenvalues(result.table, selected, args.plot))
        console.print(f"wrote {len(paths)} figures to {args.plot}")
    return 0


def parse_bytes(text: str) -> int:
    """``512MB``, ``2GB``, ... as bytes (an argparse ``type=``: a bad size is a one-line usage error)."""
    units = {"kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "b": 1, "": 1}
    t = text.strip().lower()
    number = t.rstrip("kmgb")
    try:
        value = int(float(number) * units[t[len(number):]])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a size such as 512MB or 2GB, got {text!r}") from None
    if value < 1 << 20:
        raise argparse.ArgumentTypeError(f"at least 1MB, got {text!r}")
    return value


def _parse_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH such as -0.5,1.0, got {text!r}") from None
    if not lo < hi:
        raise argparse.ArgumentTypeError(f"LOW must be below HIGH, got {text!r}")
    return lo, hi


def cmd_embeddings(args: argparse.Namespace, console: "Console") -> int:
    from .weights.embeddings import GeometryOptions, embeddings
    from .views import ProgressDisplay, print_embeddings

    config = _config(args)
    lo, hi = args.range
    options = GeometryOptions(threshold=args.threshold, bins=args.bins, lo=lo, hi=hi, precision=args.precision,
                              max_memory=args.max_memory, sample=args.sample, seed=config.seed,
                              exclude_untrained=args.exclude_untrained)
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


def _parse_k_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(p) for p in text.replace("-", "..").split(".."))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW..HIGH such as 2..64, got {text!r}") from None
    if not 2 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 2 <= LOW <= HIGH, got {text!r}")
    return lo, hi


def _parse_k_values(text: str) -> list[int]:
    try:
        k_values = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}") from None
    if not k_values or any(k < 2 for k in k_values):
        raise argparse.ArgumentTypeError(f"every k must be >= 2, got {text!r}")
    return k_values


def cmd_clusters(args: argparse.Namespace, console: "Console") -> int:
    from .weights.clusters import clusters
    from .views import ProgressDisplay, print_clusters

    config = _config(args)
    with ProgressDisplay("k-means") as progress:
        result = clusters(args.path, config, k_range=args.k_range, k_values=args.k_values,
                          roles=(args.matrix,), selection=args.select_by, revision=args.revision,
                          exclude_untrained=args.exclude_untrained,
                          progress=progress.update)
    print_clusters(result, console)
    if args.out:
        console.print(f"wrote {result.save(args.out)}")
    if args.plot:
        import pandas as pd

        from .plots import selection_curve

        for role, res in result.matrices.items():
            console.print(f"wrote {selection_curve(pd.DataFrame(res['scores']), res['chosen_k'], args.plot, role)}")
    return 0


def _check_compare(args: argparse.Namespace) -> None:
    if args.base is None and len(args.paths) < 2:
        raise LayerscopeError("compare needs two checkpoints (A B), or a base (--base) and at least one fine-tune")
    if args.trim <= 0:
        raise LayerscopeError(f"--trim must lie in (0, 1], got {args.trim:g}")
    if args.data is None:
        given = [flag for flag, value in (("--text-field", args.text_field), ("--seq-len", args.seq_len),
                                          ("--dtype", args.model_dtype)) if value is not None]
        if given:
            raise LayerscopeError(f"{', '.join(given)}: only with --data (CKA on data)")
    elif not Path(args.data).expanduser().exists():  # before any drift is computed
        raise LayerscopeError(f"--data {args.data}: no such file or directory")


def cmd_compare(args: argparse.Namespace, console: "Console") -> int:
    from .change.compare import compare
    from .views import ProgressDisplay, print_compare

    with ProgressDisplay("comparing") as progress:
        result = compare(*args.paths, base=args.base, config=_config(args), top_k=args.top_k, procrustes=not args.no_procrustes,
                         spectral=not args.no_spectral, keep=args.trim, data=args.data, text_field=args.text_field,
                         seq_len=args.seq_len, batches=args.batches, batch_size=args.batch_size,
                         model_dtype=args.model_dtype,
                         progress=lambda done, total, name: progress.update(
                             "CKA batches" if name == "cka batches" else "tensors", done, total, name))
    print_compare(result, console)
    if args.out:
        console.print(f"wrote {result.save(args.out)}")
    if args.plot:
        from .plots import drift_by_layer

        for label in result.models:
            rows = result.table[result.table["model"] == label]
            console.print(f"wrote {drift_by_layer(rows, Path(args.plot) / label, f'drift {result.reference} → {label}')}")
    return 1 if any(result.table["error"].astype(str).str.startswith("unreadable")) else 0


def _check_trajectory(args: argparse.Namespace) -> None:
    """--plot-metrics must name columns the table will have: metric names or drift columns."""
    if not args.plot:
        return
    from .change.compare import DRIFT_COLUMNS
    from .weights.metrics import select_metrics

    known = {m.name for m in select_metrics(_config(args))}
    known |= {f"drift_{ref}_{c}" for ref in ("first", "prev") for c in DRIFT_COLUMNS}
    if args.plot_metrics == _comma(PLOT_METRICS_DEFAULT):  # the defaults: plot those that --metrics computes
        args.plot_metrics = [m for m in args.plot_metrics if m in known]
    unknown = [m for m in args.plot_metrics if m not in known]
    if unknown:
        raise LayerscopeError(f"--plot-metrics: no column {', '.join(unknown)} (columns: {', '.join(sorted(known))})")


def cmd_trajectory(args: argparse.Namespace, console: "Console") -> int:
    from .change.trajectory import trajectory
    from .views import ProgressDisplay, print_trajectory

    with ProgressDisplay("trajectory") as progress:
        result = trajectory(args.paths, _config(args), procrustes=args.procrustes, progress=progress.update)
    print_trajectory(result, console)
    if args.out:
        console.print(f"wrote {result.save(args.out)}")
    if args.plot:
        from .plots import metric_over_steps

        for metric in args.plot_metrics:
            if metric not in result.table.columns:
                raise LayerscopeError(f"--plot-metrics: no column {metric!r} (columns: {', '.join(result.table.columns[6:])})")
            console.print(f"wrote {metric_over_steps(result.table, metric, args.plot)}")
    return 1 if result.skipped else 0


def cmd_report(args: argparse.Namespace, console: "Console") -> int:
    from .report import report
    from .views import ProgressDisplay

    with ProgressDisplay("report") as progress:
        result = report(args.paths, _config(args), out=args.out, markdown=args.md,
                        embeddings=True if args.embeddings else None, clusters=True if args.clusters else None,
                        progress=progress.update)
    console.print(f"wrote {result.html}" + (f" and {result.markdown}" if result.markdown else "")
                  + f" in {result.seconds:.1f} s")
    return 1 if any(m.analysis.unreadable for m in result.models) else 0


def cmd_run(args: argparse.Namespace, console: "Console") -> int:
    from .run import run

    result = run(args.path, _config(args), out=args.out, revision=args.revision, skip=set(args.skip), console=console,
                 exclude_untrained=args.exclude_untrained)
    stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.stage_seconds.items())
    console.print(f"[bold]report:[/bold] {result.html}  (Markdown: {result.markdown}; {result.seconds:.1f} s in all: {stages})")
    return 1 if any(m.analysis.unreadable for m in result.models) else 0


def cmd_probe(args: argparse.Namespace, console: "Console") -> int:
    from .probes.curvature import HessianOptions
    from .probes.probe import print_probe, probe
    from .views import ProgressDisplay

    config = _config(args)
    hessian: Any = False
    if args.hessian:
        blocks = tuple(b.strip() for b in args.blocks.split(",") if b.strip() and b.strip() != "none")
        hessian = HessianOptions(top_k=args.top_k, tol=args.tol, max_iter=args.max_iter,
                                 trace_max=args.trace_samples, trace_min=min(10, args.trace_samples),
                                 trace_rel_error=args.trace_rel_error or None, density_runs=args.density_runs,
                                 density_steps=args.density_steps, blocks=blocks, seed=config.seed)
    from .probes.fisher_cli import fisher_options, wants_fisher
    from .probes.gradients import from_args as gradient_options

    datas = args.data or [None]
    fisher = fisher_options(args, config.seed) if wants_fisher(args) or len(datas) > 1 else False
    gradients = gradient_options(args) or False
    with ProgressDisplay("probe") as progress:
        result = probe(args.path, datas[0], hessian=hessian, fisher=fisher, prune=args.prune, held_out=args.held_out,
                       compare_data=datas[1:], gradients=gradients, text_field=args.text_field, seq_len=args.seq_len,
                       batches=args.batches, batch_size=args.batch_size, seed=config.seed, device=args.device,
                       dtype=args.model_dtype, config=config, revision=args.revision, progress=progress.update)
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
    if args.plot and result.fisher is not None:
        from .probes.figures import fisher_by_layer, fisher_heads, pruning_curves

        f, name = result.fisher, result.model.label.rsplit("/", 1)[-1]
        paths = [fisher_by_layer(f.layers, args.plot, name)] + ([fisher_heads(f.heads, args.plot, name)] if len(f.heads) else [])
        if f.pruning is not None:
            paths.append(pruning_curves(f.pruning.curves, args.plot, name))
        console.print(f"wrote {len(paths)} Fisher figures to {args.plot}")
    return 0


def cmd_activations(args: argparse.Namespace, console: "Console") -> int:
    from .probes.activations import ActivationOptions, activations, print_activations
    from .views import ProgressDisplay

    config = _config(args)
    options = ActivationOptions(cka_tokens=args.cka_tokens, neuron_threshold=args.neuron_threshold, seed=config.seed)
    with ProgressDisplay("activations") as progress:
        result = activations(args.path, args.data, other=args.other, text_field=args.text_field, seq_len=args.seq_len,
                             batches=args.batches, batch_size=args.batch_size, seed=config.seed, device=args.device,
                             dtype=args.model_dtype, config=config, revision=args.revision, options=options,
                             progress=progress.update)
    print_activations(result, console)
    if args.out:
        console.print(f"wrote {result.save(args.out)}")
    if args.plot:
        from .probes.activation_figures import activation_figures

        paths = activation_figures(result, args.plot)
        console.print(f"wrote {len(paths)} figures to {args.plot}")
    return 0


def cmd_landscape(args: argparse.Namespace, console: "Console") -> int:
    from .probes.landscape import landscape, print_landscape
    from .views import ProgressDisplay

    config = _config(args)
    with ProgressDisplay("landscape") as progress:
        result = landscape(args.paths, args.data, directions=args.directions, grid=args.grid, span=args.span,
                           points=args.points, extend=args.extend, pad=args.pad, seed=args.seed,
                           points_per_forward=args.points_per_forward, device=args.device or config.device,
                           dtype=args.model_dtype, seq_len=args.seq_len, batches=args.batches, batch_size=args.batch_size,
                           data_seed=args.data_seed, text_field=args.text_field, store=config.resolved_store(),
                           cache=config.cache, progress=progress.update)
    print_landscape(result, console)
    if args.out:
        console.print(f"wrote {result.save(args.out)}")
    if args.plot:
        paths = result.plot(args.plot)
        console.print(f"wrote {len(paths)} figures to {args.plot}")
    return 0


def cmd_metrics(args: argparse.Namespace, console: "Console") -> int:
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


def cmd_merge(args: argparse.Namespace, console: "Console") -> int:
    from .probes.fisher_cli import cmd_merge as run_merge

    return run_merge(args, console)


COMMANDS = {"merge": cmd_merge, "info": cmd_info, "analyze": cmd_analyze, "heads": cmd_heads, "embeddings": cmd_embeddings,
            "clusters": cmd_clusters, "compare": cmd_compare, "trajectory": cmd_trajectory, "report": cmd_report, "run": cmd_run, "probe": cmd_probe,
            "activations": cmd_activations, "landscape": cmd_landscape,
            "metrics": cmd_metrics}


def _implicit_info(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``layerscope gpt2`` and ``layerscope model.safetensors`` mean ``layerscope info ...``: a first
    word that is neither a command, nor an option, nor a near-miss of a command (``analyse``)."""
    import difflib

    commands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if argv and argv[0] not in commands and not argv[0].startswith("-") \
            and not difflib.get_close_matches(argv[0], list(commands), n=1, cutoff=0.75):
        return ["info", *argv]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = _implicit_info(list(sys.argv[1:] if argv is None else argv), parser)
    try:
        args = parser.parse_args(argv)  # single-flag errors: one line, exit 2, before anything else
    except SystemExit as exc:  # --help, --version, usage errors: a status to return, as for every other outcome
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    logging.basicConfig(level=logging.WARNING, format="layerscope: %(message)s")
    try:
        preflight(args, _config)  # config file, metric names, flags that depend on each other
        from rich.console import Console

        return COMMANDS[args.command](args, Console())
    except LayerscopeError as exc:
        print(f"layerscope: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layerscope: interrupted; results computed so far are in the store, run again to resume", file=sys.stderr)
        sys.stderr.flush()
        from .executor import close_clusters

        close_clusters()  # os._exit skips atexit, where Ray would stop the processes it started
        os._exit(130)  # do not wait for worker threads still inside a decomposition
    except Exception as exc:  # a bug of ours: still one line, traceback on request
        if os.environ.get("LAYERSCOPE_DEBUG"):
            raise
        print(f"layerscope: internal error: {type(exc).__name__}: {exc} (set LAYERSCOPE_DEBUG=1 for a traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
