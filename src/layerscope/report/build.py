"""Gather every analysis of one or more models (from the store, computing what is missing) and
lay it out as a report: model card, metrics through depth per weight type, phases, outliers,
heads, MLP spectra, embedding geometry, clusters, and side-by-side comparison and drift."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from .. import __version__
from ..config import Config
from ..errors import LayerscopeError
from ..views import UNTRAINED_MARK
from . import depth, health
from .findings import HEAVY_RULE, MP_RULE, mp_verdicts
from .document import Document, Figure, Gallery, Items, Section, TableBlock, Text, to_html, to_markdown

Progress = Callable[[str, int, int], None]


@dataclass
class ModelData:
    """Everything the report shows about one model; analyses that were not run are None."""

    label: str
    analysis: Any  # AnalysisResult
    heads: Any = None  # HeadsResult
    mlp: pd.DataFrame | None = None
    embeddings: Any = None  # EmbeddingsResult
    clusters: Any = None  # ClustersResult
    notes: list[str] = field(default_factory=list)
    probe: Any = None  # probes.ProbeResult (the model run on data), when it was run
    activations: Any = None  # probes.activations.ActivationsResult, when it was run
    landscapes: list = field(default_factory=list)  # probes.landscape.LandscapeResult stored for this checkpoint

    @property
    def table(self) -> pd.DataFrame:
        return self.analysis.table


def collect(path: Any, config: Config, *, embeddings: bool | None = None, clusters: bool | None = None,
            progress: Progress | None = None, label: str | None = None, exclude_untrained: bool = False) -> ModelData:
    """Run (or read from the store) what the report needs. ``embeddings``/``clusters``: True to
    compute, None to include only if stored, False to leave out. Heads and MLP spectra are cheap
    and always included when the model has them."""
    from ..weights.clusters import clusters as run_clusters
    from ..change.compare import short_label
    from ..weights.embeddings import GeometryOptions, embeddings as run_embeddings
    from ..weights.heads import heads as run_heads
    from ..weights.mlp import mlp_down_spectra
    from ..pipeline import analyze
    from ..sources import open_source

    source = open_source(path)
    if progress:
        progress("analyze", 0, len(source.infos))
    analysis = analyze(source, config, progress=(lambda d, t, n: progress("analyze", d, t)) if progress else None)
    data = ModelData(label or short_label(source), analysis)
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("heads", lambda: run_heads(source, config, progress=(lambda d, t, n: progress("heads", d, t)) if progress else None)),
        ("mlp", lambda: mlp_down_spectra(source, config)),
    ]
    if embeddings is not False:
        steps.append(("embeddings", lambda: _nonempty(run_embeddings(
            source, config, cached_only=not embeddings, options=GeometryOptions(exclude_untrained=exclude_untrained),
            progress=(lambda n, d, t: progress("embeddings", d, t)) if progress else None))))
    if clusters is not False:
        steps.append(("clusters", lambda: _nonempty(run_clusters(
            source, config, cached_only=not clusters, exclude_untrained=exclude_untrained,
            progress=(lambda n, d, t: progress("clusters", d, t)) if progress else None))))
    for name, step in steps:
        if progress:
            progress(name, 0, 1)
        try:
            setattr(data, name, step())
        except LayerscopeError as exc:  # e.g. no attention layers, no embedding: the section is left out
            data.notes.append(f"{name}: {exc}")
        if progress:
            progress(name, 1, 1)
    try:  # landscapes computed earlier with this checkpoint (layerscope landscape), from the store
        from .health import stored_landscapes

        data.landscapes = stored_landscapes(source, config)
    except Exception as exc:  # the report goes on without them
        data.notes.append(f"landscapes: {exc}")
    return data


def _nonempty(result: Any) -> Any:
    return result if result is not None and result.matrices else None


# -- sections --------------------------------------------------------------------------------------
def _card(models: list[ModelData]) -> pd.DataFrame:
    rows: dict[str, list[Any]] = {}

    def add(key: str, values: list[Any]) -> None:
        rows[key] = values

    a = [m.analysis for m in models]
    add("source", [r.source.label for r in a])
    add("format", [r.source.format for r in a])
    add("revision", [r.source.revision or "—" for r in a])
    add("architecture family", [r.anatomy.family for r in a])
    for key, label in (("n_layers", "layers"), ("d_model", "d_model"), ("n_heads", "attention heads"),
                       ("n_kv_heads", "key/value heads"), ("head_dim", "head dim"), ("d_ff", "MLP width"),
                       ("vocab_size", "vocabulary")):
        add(label, [getattr(r.anatomy.dims, key, None) for r in a])
    add("parameters", [f"{r.anatomy.parameter_count:,}" for r in a])
    add("buffers (not parameters)", [", ".join(f"{n} ({c:,})" for n, c in r.anatomy.buffers().items()) or "—"
                                     for r in a])
    add("tensors", [len(r.anatomy.entries) for r in a])
    add("dtypes", [", ".join(f"{k} ×{v}" for k, v in r.anatomy.dtype_counts().items()) for r in a])
    add("tied embeddings", [_tied_text(r.anatomy) for r in a])
    add("step", [r.source.step if r.source.step is not None else "—" for r in a])
    frame = pd.DataFrame(rows, index=[m.label for m in models]).T.reset_index()
    return frame.rename(columns={"index": "property"})


def _tied_text(anatomy) -> Any:
    if anatomy.tied_embeddings is not None:
        return anatomy.tied_embeddings
    return "no LM head" if not anatomy.by_role("lm_head") else "unknown"


def _stats_frame(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    rows = []
    for role in depth.layered_roles(table):
        s = depth.series_stats(depth.layer_series(table, role, metric))
        if s:
            rows.append({"weight type": role, **s})
    return pd.DataFrame(rows)


def _findings(models: list[ModelData]) -> tuple[list[str], list[str]]:
    """(context lines, findings): the findings are only claims that passed their stated tests."""
    from ..weights.heads import head_label
    from .findings import mp_verdicts, model_findings

    context, found = [], []
    for m in models:
        t = m.table
        prefix = f"{m.label}: " if len(models) > 1 else ""
        mats = t[t["shape"].astype(str).str.contains("×")]
        notes = int((t["error"].astype(str) != "").sum())
        context.append(f"{prefix}{len(mats)} matrices among {len(t)} tensors and slices analysed ({m.analysis.computed} "
                       f"computed, {m.analysis.cached} from the store); {notes} with notes (see analysis.csv).")
        verdicts = mp_verdicts(t)
        if len(verdicts):
            differs = int((verdicts["verdict"] == "differs from random").sum())
            context.append(f"{prefix}{differs} of {len(verdicts)} matrices differ from a random matrix of their shape "
                           "and scale (random-matrix test); only those can carry a finding.")
        found += [prefix + str(f) for f in model_findings(t)]
        if m.heads is not None:
            for name, heads, bound in m.heads.categories.items():
                if heads:
                    shown = ", ".join(head_label(a, b) for a, b in heads[:12]) + (" …" if len(heads) > 12 else "")
                    found.append(f"{prefix}{len(heads)} {name} head{'s' if len(heads) > 1 else ''} ({bound}, "
                                 f"random heads: see Attention heads): {shown} [head null test]")
        if m.clusters is not None:
            from ..views import cluster_verdict_text

            for role, r in m.clusters.matrices.items():
                if r["verdict"]["structure"] or r["verdict"]["elbow_claimed"]:
                    found.append(f"{prefix}{role} clusters: {cluster_verdict_text(r)} [cluster rule]")
    return context, found


def build_document(models: list[ModelData], figures: Path, compare_result: Any = None,
                   compare_error: str | None = None) -> Document:
    from .. import plots

    figures.mkdir(parents=True, exist_ok=True)
    many = len(models) > 1
    sections: list[Section] = []
    sections.append(Section("Model card", [TableBlock(_card(models))]))
    context, found = _findings(models)

    key = Section("Key findings", [Items(context)])
    if found:
        key.blocks += [Text("Findings — each passed the tests named in brackets, by the rules stated below:"), Items(found)]
    else:
        key.blocks.append(Text("Nothing stands out: no matrix, head or cluster passes the tests stated below. The "
                               "tables further down hold every number."))
    key.blocks += [Text("Rules:"), Items([MP_RULE, depth.OUTLIER_RULE + " A matrix finding needs both this and the "
                                          "random-matrix test.", HEAVY_RULE])]
    sections.append(key)

    # metrics through depth, per weight type
    intro = Section("Metrics through depth, per weight type", [Text(
        "Each line is one weight type (q, k, v, o, gate, up, down, …) and each point one layer; experts and "
        "fused slices of a layer are averaged. Colours are the same in every figure. The tables give, per weight "
        "type, the statistics of the metric over layers (cv: coefficient of variation std/|mean|).")])
    sections.append(intro)
    tables = {m.label: m.table for m in models}
    if not any(depth.layered_roles(t) for t in tables.values()):
        intro.blocks = [Text("No weight type repeats over layers in this checkpoint (its tensor names match no known "
                             "architecture), so there is no depth profile; every matrix's metrics are in the table "
                             "of the analysis (analysis.csv).")]
        tables = {}
    for metric, label in depth.DEPTH_METRICS.items():
        if not any(metric in t and t[metric].notna().any() for t in tables.values()):
            continue
        sec = Section(label, level=3)
        path = plots.metric_by_layer(tables, metric, figures, label)
        sec.blocks.append(Figure(path, f"{label} by layer" + (" — one panel per model" if many else "")))
        for m in models:
            frame = _stats_frame(m.table, metric)
            if len(frame):
                sec.blocks.append(TableBlock(frame, f"{metric} over layers" + (f" — {m.label}" if many else "")))
        sections.append(sec)

    # phases and outliers
    phase = Section("Phase analysis: early, middle and late layers", [Text(depth.SHAPE_RULE)])
    for m in models:
        frame = depth.phase_table(m.table)
        if len(frame):
            phase.blocks.append(TableBlock(frame, "thirds' means, shape, largest layer-over-layer changes"
                                           + (f" — {m.label}" if many else ""), max_rows=80))
        else:
            phase.blocks.append(Text("Fewer than three layers: no phases to compare."))
    sections.append(phase)
    mp = Section("Random-matrix test (Marchenko–Pastur)", [Text(MP_RULE), Text(
        "mp_spikes: singular values above the MP edge plus the Tracy–Widom margin; mp_ks: Kolmogorov–Smirnov distance "
        "of the eigenvalue distribution from the fitted MP law; mp_softrank: the square of MP edge over largest singular value (WeightWatcher's; 1 for a "
        "random matrix).")])
    for m in models:
        frame = mp_verdicts(m.table)
        if len(frame):
            mp.blocks.append(TableBlock(frame.drop(columns=["role", "layer"]), "per matrix"
                                        + (f" — {m.label}" if many else ""), max_rows=80))
        else:
            mp.blocks.append(Text(f"{m.label + ': ' if many else ''}no matrix has the MP metrics (they were not "
                                  "computed; run analyze with the spectral metrics)."))
    sections.append(mp)
    outl = Section("Outlier matrices", [Text(depth.OUTLIER_RULE), Text(
        "An outlier is a finding only when its spectrum also differs from random (column 'random-like' is no).")])
    for m in models:
        frame = depth.outliers(m.table)
        cols = ["name", "metric", "robust z", "random-like", "why"]
        if len(frame):
            outl.blocks.append(TableBlock(frame[cols], f"{len(frame)} outlier values" + (f" — {m.label}" if many else "")))
        else:
            outl.blocks.append(Text(f"{m.label + ': ' if many else ''}no matrix is an outlier by this rule."))
    sections.append(outl)

    for m in models:
        suffix = f" — {m.label}" if many else ""
        if m.heads is not None:
            sections.append(_heads_section(m, figures, suffix))
        if m.activations is not None:  # behaviour on text, next to the weight-based head maps
            from .activations import activations_section

            sections.append(activations_section(m, figures, suffix))
        if m.mlp is not None and len(m.mlp):
            curves = [(f"layer {int(r.layer)}", np.asarray(r.explained_variance)) for r in m.mlp.itertuples()]
            path = plots.explained_variance_curves(curves, figures / _slug(m.label))
            kappa = m.mlp[["layer", "name", "condition_number"]]
            sections.append(Section("MLP down-projection spectra" + suffix, [
                Text("Cumulative share of Σσ² captured by the top singular values of each layer's down-projection: "
                     "a curve that rises steeply means a few directions carry the layer's output."),
                Figure(path, "cumulative explained variance per layer"), TableBlock(kappa, "condition numbers")]))
        if m.embeddings is not None:
            sections.append(_embeddings_section(m, figures, suffix))
        if m.clusters is not None:
            sections.append(_clusters_section(m, figures, suffix))
        if m.probe is not None:
            sections.append(_probe_section(m, figures, suffix))
            if getattr(m.probe, "fisher", None) is not None:
                from .fisher import fisher_section

                sections.append(fisher_section(m.probe.fisher, figures, m.label, suffix))
        sections.extend(health.sections(m, figures, suffix))  # loss landscapes, gradient health
    if many:
        sections.append(_comparison_section(models, figures, compare_result, compare_error))
    for m in models:
        if m.notes:
            sections.append(Section("Notes" + (f" — {m.label}" if many else ""), [Items(m.notes)]))
    title = "layerscope report: " + ", ".join(m.label for m in models)
    subtitle = f"Generated by layerscope {__version__} on {time.strftime('%Y-%m-%d %H:%M')} from " + \
        "; ".join(m.analysis.source.label for m in models)
    return Document(title, subtitle, sections)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def _heads_section(m: ModelData, figures: Path, suffix: str) -> Section:
    from .. import plots
    from ..weights.heads import head_label

    h = m.heads
    d = h.anatomy.dims
    cats = h.categories
    sec = Section("Attention heads" + suffix, [Text(
        f"{d.n_heads} query heads and {d.n_kv_heads} key/value heads of dimension {d.head_dim} per layer. QK circuit "
        "W_Qᵀ W_K (where a head looks) and OV circuit W_O W_V (what it writes), computed in factored form. "
        "A copying head has an OV circuit with mostly positive eigenvalues (copying score ΣRe λ / Σ|λ| near 1). "
        "Each map has one colour scale for its metric: effective ranks from 0 to head_dim, the signed copying score "
        "on a diverging scale centred at 0.")])
    paths = plots.head_heatmaps(h.table, figures / _slug(m.label), m.label, metrics=plots.REPORT_HEAD_METRICS,
                                head_dim=d.head_dim)
    sec.blocks.append(Gallery([Figure(p, plots.HEAD_MAP_METRICS[p.stem.removeprefix("heads_")] + " (layer × head)")
                               for p in paths]))
    null = cats.null
    sec.blocks.append(Text(cats.rule + f" Here the null gives QK effective rank {null.qk_entropy_rank[0]:.3g} ± "
                           f"{null.qk_entropy_rank[1]:.2g} of {cats.head_dim}, and OV copying score "
                           f"{null.ov_copying_score[0]:.2g} ± {null.ov_copying_score[1]:.2g}."))
    show = lambda heads: ", ".join(head_label(a, b) for a, b in heads[:48]) + (" …" if len(heads) > 48 else "")  # noqa: E731
    lines = [f"{name} heads ({bound}): {show(heads) or 'none'}" for name, heads, bound in cats.items()]
    if not any(heads for _, heads, _ in cats.items()):
        lines.append("Nothing stands out: every head is within the range of random heads by these rules.")
    sec.blocks.append(Items(lines))
    from ..views import layer_keys

    keys = layer_keys(h.table) + (["attention"] if "attention" in h.table.columns else [])
    means = h.table.groupby(keys, sort=False)[["qk_entropy_rank", "ov_entropy_rank", "qk_asymmetry", "ov_copying_score"]].mean()
    sec.blocks.append(TableBlock(means.reset_index(), "per-layer means over heads"))
    return sec


def _embeddings_section(m: ModelData, figures: Path, suffix: str) -> Section:
    from .. import plots

    sec = Section("Embedding geometry" + suffix, [Text(
        "Exact cosine similarity over all pairs of token embeddings (streamed, never a V × V matrix). A mean far "
        "above 0 means the embeddings share a common direction (anisotropy); hubs are tokens close to many others.")])
    for role, g in m.embeddings.matrices.items():
        for note in g.get("notes", []):
            sec.blocks.append(Text(f"Note: {note}."))
        path = plots.cosine_histogram(g, figures / _slug(m.label), role)
        thr = g["threshold"]
        rows = [("matrix", f"{g['name']} ({g['vocab_size']:,} × {g['dim']})"),
                ("pairs", f"{g['pairs']:,}" + (" (sampled estimate)" if g.get("method") == "sample" else " (all, exact)")),
                ("cosine mean ± std", f"{g['mean']:.4f} ± {g['std']:.4f}"),
                ("percentiles", ", ".join(f"{k}: {depth_fmt(v)}" for k, v in g.get("percentiles", {}).items())),
                ("isotropy ‖mean row‖ / mean ‖row‖", f"{g['isotropy']['mean_vector_norm_over_mean_norm']:.4f}"),
                ("row norms", f"mean {g['norms']['mean']:.4g}, min {g['norms']['min']:.4g}, max {g['norms']['max']:.4g}")]
        if "neighbors_per_token" in thr:
            rows.append((f"pairs with cosine > {thr['value']}", f"{thr['pairs_above']:,}"))
            rows.append(("top hub tokens", ", ".join(f"{h.get('text', h['id'])!r}{UNTRAINED_MARK if h.get('untrained') else ''}"
                                                     f" ({h['neighbors']})" for h in thr["top_hubs"][:10])))
        u = g.get("untrained")
        if u:
            rows.append(("untrained-looking rows", f"{u['count']:,} ({u['by_name']:,} by name, {u['by_similarity']:,} by "
                         f"similarity to them), marked {UNTRAINED_MARK}" + ("; excluded from these statistics"
                                                                           if u["excluded"] else "")))
        sec.blocks.append(TableBlock(pd.DataFrame(rows, columns=["", role])))
        sec.blocks.append(Figure(path, f"all-pairs cosine similarity of {role}"))
        if u:
            sec.blocks.append(Text(f"{UNTRAINED_MARK} {u['rule']}"))
    return sec


def depth_fmt(v: Any) -> str:
    return "out of range" if v is None else f"{v:.3f}"


def _clusters_section(m: ModelData, figures: Path, suffix: str) -> Section:
    from .. import plots
    from ..views import cluster_verdict_text
    from ..weights.clusters import VERDICT_RULE

    sec = Section("Token clusters" + suffix, [Text(VERDICT_RULE)])
    for role, r in m.clusters.matrices.items():
        scores = pd.DataFrame(r["scores"])
        sec.blocks.append(Text(f"{r['name']}: k-means over k in {', '.join(map(str, r['k_candidates']))}; k = "
                               f"{r['chosen_k']} has the best {r['selection'].replace('_', '-')}. "
                               + cluster_verdict_text(r) + " Each cluster is shown by the tokens nearest its centre."))
        sec.blocks.append(Figure(plots.selection_curve(scores, r["chosen_k"], figures / _slug(m.label), role),
                                 "choosing k: Calinski–Harabasz, silhouette and inertia"))
        rows = []
        for c in r["clusters"]:
            marks = c.get("untrained") or [False] * len(c["text"])
            rows.append({"cluster": c["cluster"], "size": c["size"], "tokens nearest the centre": ", ".join(
                repr(t) + (UNTRAINED_MARK if u else "") for t, u in zip(c["text"], marks))})
        sec.blocks.append(TableBlock(pd.DataFrame(rows), f"{len(rows)} clusters, largest first", max_rows=40))
        u = r.get("untrained")
        if u and u["count"]:
            sec.blocks.append(Text(f"{UNTRAINED_MARK} untrained-looking token ({u['count']:,} in this vocabulary"
                                   + (", left out of the clustering" if u["excluded"] else "") + f"). {u['rule']}"))
    return sec


def _comparison_section(models: list[ModelData], figures: Path, compare_result: Any,
                        compare_error: str | None = None) -> Section:
    from .. import plots

    sec = Section("Comparison", [Text("Mean of each metric over the matrices of each weight type, per model.")])
    rows = []
    for m in models:
        mats = m.table[m.table["shape"].astype(str).str.contains("×")]
        for role, g in mats.groupby("role"):
            rows.append({"model": m.label, "weight type": role, "matrices": len(g),
                         **{k: float(pd.to_numeric(g[k], errors="coerce").replace([np.inf, -np.inf], np.nan).mean())
                            for k in depth.DEPTH_METRICS if k in g}})
    sec.blocks.append(TableBlock(pd.DataFrame(rows), "side by side", max_rows=120))
    if compare_result is None:
        sec.blocks.append(Text(f"No drift section: the comparison failed ({compare_error})." if compare_error else
                               "The models do not share an architecture, so no drift is computed."))
        return sec
    sec.blocks.append(Text(f"Drift from {compare_result.reference} (relative change ‖B − A‖/‖A‖, and the cosine "
                           "after the orthogonal Procrustes rotation that best aligns A to B)."))
    for label in compare_result.models:
        rows = compare_result.table[compare_result.table["model"] == label]
        sec.blocks.append(Figure(plots.drift_by_layer(rows, figures / f"drift_{_slug(label)}",
                                                      f"drift {compare_result.reference} → {label}"),
                                 f"drift {compare_result.reference} → {label} by layer"))
        mats = rows[rows["shape"].astype(str).str.contains("×")].sort_values("rel_change", ascending=False)
        sec.blocks.append(TableBlock(mats[["name", "role", "rel_change", "cosine", "procrustes_cosine"]].head(12),
                                     f"most changed matrices, {label}"))
        tok = compare_result.tokens.get(label)
        if tok:
            sec.blocks.append(Items([
                f"token drift after alignment ({tok['tokens']:,} tokens): mean cosine {tok['mean_cosine']:.4f}, "
                f"median {tok['median_cosine']:.4f}, 10th percentile {tok['p10_cosine']:.4f}",
                "most drifted: " + ", ".join(f"{t['text']!r} ({t['cosine']:.2f})" for t in tok["most_drifted"][:12]),
                "least drifted: " + ", ".join(f"{t['text']!r} ({t['cosine']:.2f})" for t in tok["least_drifted"][:12]),
            ]))
        cka = compare_result.cka
        if cka is not None and (cka["model"] == label).any():
            part = cka[cka["model"] == label]
            shown = pd.DataFrame({"data": part["data"], "output of": ["embeddings" if pd.isna(v) else f"block {int(v)}"
                                                                      for v in part["layer"]], "cka": part["cka"]})
            sec.blocks.append(TableBlock(shown, f"debiased linear CKA between {compare_result.reference} and {label}, "
                                                "layer by layer, on the same tokens (from layerscope compare --data)",
                                         max_rows=200))
    if compare_result.mismatch:
        sec.blocks.append(Items([f"{label}: {p}" for label, ps in compare_result.mismatch.items() for p in ps]))
    return sec


def _probe_section(m: ModelData, figures: Path, suffix: str) -> Section:
    """The model run on data: loss, Hessian curvature summary, density and per-layer curvature."""
    p = m.probe
    d = p.data
    sec = Section("On data: loss and curvature" + suffix, [Text(
        f"The model run on {d.description}: {d.n_batches} batches, {d.tokens:,} target tokens (data hash "
        f"{d.hash[:12]}). Loss = mean token cross-entropy {p.loss.loss:.4f} nats, perplexity {p.loss.perplexity:.4g}.")])
    h = p.hessian
    if h is None:
        return sec
    from ..probes.figures import block_curvature, hessian_density

    s = h.summary()
    verdict = ("no negative eigenvalue beyond its Ritz residual: a minimum on these batches" if h.is_minimum else
               f"the most negative eigenvalue is {s['negative_to_top_ratio']:.3g} × the largest: a saddle on these batches")
    rows = [("top eigenvalue λ_max", f"{s['top_eigenvalue']:.6g} (Ritz residual {s['top_residual']:.1e})"),
            ("most negative eigenvalue λ_min", f"{s['min_eigenvalue']:.6g} (residual {s['min_residual']:.1e})"),
            ("trace", f"{s['trace']:.6g} ± {s['trace_std_error']:.2g} (Hutchinson, {s['trace_samples']} samples)"),
            ("Lanczos", f"{s['lanczos_iterations']} steps, {'converged' if s['converged'] else 'not converged'}"),
            ("parameters", f"{s['parameters']:,}"), ("verdict", verdict)]
    sec.blocks.append(TableBlock(pd.DataFrame(rows, columns=["Hessian of the loss", "value"])))
    sec.blocks.append(TableBlock(h.eigenvalues, "top eigenvalues with their Ritz residuals"))
    sec.blocks.append(Text("Eigenvalues by Lanczos with full reorthogonalisation, stopped when every reported Ritz "
                           "residual is at most tol·|λ_max| (a true eigenvalue lies within its residual). Density by "
                           "stochastic Lanczos quadrature (Gaussian-smoothed)."))
    slug = figures / _slug(m.label)
    sec.blocks.append(Figure(hessian_density(h.density, slug, m.label, top=s["top_eigenvalue"], bottom=s["min_eigenvalue"]),
                             "Hessian spectral density (log scale)"))
    if len(h.blocks) and (h.blocks["kind"] == "layer").any():
        sec.blocks.append(Figure(block_curvature(h.blocks, slug, m.label), "top eigenvalue and trace of each layer's block"))
        cols = ["kind", "block", "parameters", "top_eigenvalue", "min_eigenvalue", "trace", "trace_std_error"]
        sec.blocks.append(TableBlock(h.blocks[cols], "curvature per block (Hessian restricted to the block)", max_rows=80))
    return sec


# -- the report ------------------------------------------------------------------------------------
@dataclass
class Report:
    html: Path
    markdown: Path | None
    figures: Path
    models: list[ModelData]
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)  # filled by ``layerscope run``


def report(paths: Sequence[Any], config: Config | None = None, *, out: str | Path = "layerscope-report/report.html",
           markdown: str | Path | None = None, embeddings: bool | None = None, clusters: bool | None = None,
           progress: Progress | None = None, models: list[ModelData] | None = None) -> Report:
    """Write the HTML report (and Markdown with PNGs beside it when ``markdown`` is given).

    ``embeddings``/``clusters``: True computes them, None includes them only when already stored."""
    from ..change.compare import compare, unique_labels

    started = time.perf_counter()
    config = config or Config()
    if not paths and not models:
        raise LayerscopeError("report needs at least one checkpoint")
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise LayerscopeError(f"--out must be an .html file, got {out}")
    md = Path(markdown) if markdown else None
    if md is not None and md.suffix.lower() != ".md":
        raise LayerscopeError(f"--md must be a .md file, got {md}")
    models = models or [collect(p, config, embeddings=embeddings, clusters=clusters, progress=progress) for p in paths]
    for m, label in zip(models, unique_labels([m.label for m in models])):
        m.label = label
    figures = (md.parent if md else out.parent) / f"{(md or out).stem}_figures"
    comparison, compare_error = None, None
    if len(models) > 1 and len({m.analysis.anatomy.family for m in models}) == 1:
        try:
            comparison = compare(*[m.analysis.source for m in models], config=config, spectral=False, stored_cka=True)
        except LayerscopeError as exc:  # the report still renders, and says why drift is missing
            compare_error = str(exc)
    doc = build_document(models, figures, comparison, compare_error)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_html(doc), encoding="utf-8")
    if md is not None:
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(to_markdown(doc, md.parent), encoding="utf-8")
    return Report(out, md, figures, models, time.perf_counter() - started)

