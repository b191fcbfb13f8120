"""Ways to look at results: files (CSV, Parquet, JSON) and readable console tables.

pandas is imported inside the functions that need it: ``layerscope info`` prints through this module
and should not pay for pandas (nor matplotlib or scikit-learn, which nothing here imports).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import LayerscopeError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .anatomy import Anatomy
    from .pipeline import AnalysisResult

#: Metrics shown in the console summary, in order of preference; the full set goes to --out.
KEY_METRICS = ("entropy_rank", "stable_rank", "alpha", "condition_number", "std", "frobenius_norm")
UNTRAINED_MARK = "†"  # marks an untrained-looking token (weights.untrained.RULE)
MATRIX_ROLE_ORDER = ("attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv", "mlp.gate", "mlp.up", "mlp.down", "mlp.gate_up",
                     "moe.router", "moe.expert.gate", "moe.expert.up", "moe.expert.down",
                     "attn.q_a", "attn.q_b", "attn.kv_a", "attn.kv_b", "xattn.q", "xattn.k", "xattn.v", "xattn.o",
                     "moe.shared.gate", "moe.shared.up", "moe.shared.down", "ssm.in", "ssm.out")


def write_table(table: "pd.DataFrame", path: str | os.PathLike) -> Path:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".json"):
        raise LayerscopeError(f"{path}: output must end in .csv, .parquet or .json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    if suffix == ".csv":
        table.to_csv(tmp, index=False)
    elif suffix == ".parquet":
        try:
            table.to_parquet(tmp, index=False)
        except ImportError:
            raise LayerscopeError(f"{path}: writing Parquet needs pyarrow (pip install 'layerscope[parquet]')") from None
    else:
        table.to_json(tmp, orient="records", indent=1)
    os.replace(tmp, path)  # never leave a half-written table under the real name
    return path


def write_json(payload: Any, path: str | os.PathLike, *, indent: int = 1, default: Any = None) -> Path:
    """``payload`` as JSON (NaN and inf kept as JavaScript literals), written beside ``path`` and renamed
    into place, like ``write_table``: an interrupted write never leaves half a file under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(payload, indent=indent, allow_nan=True, default=default))
    os.replace(tmp, path)
    return path


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _fmt(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or type(value).__name__ == "NAType":
        return "—"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        if abs(value) >= 1e5 or (value != 0 and abs(value) < 1e-3):
            return f"{value:.2e}"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


# -- tables that fit the terminal ----------------------------------------------------------------
# Rich squeezes a table that is too wide by cutting every cell and header to "xxx…", which at 80
# columns made compare's headers read "delta_…" three times and every checkpoint "ckpt_000…".
# Instead: column widths are planned here, headers wrap onto several lines (never cut), numbers
# keep their full width, the one name column gives up width and is shortened from the middle (the
# start and the end, e.g. ``weight[k]`` or a step number, are what tell names apart), and if that is
# still not enough the last columns are left out with a note saying which.

#: Characters after which a header may wrap ("[" wraps before).
_BREAK_AFTER = " ._-/|,"
NAME_FLOOR = 16  # a shortened name column keeps at least this many cells


def column_label(column: str) -> str:
    """A header for a table column: ``delta_entropy_rank`` → ``Δ entropy rank`` (wraps at the spaces)."""
    label = f"Δ {column[len('delta_'):]}" if column.startswith("delta_") else column
    return label.replace("_", " ")


def _header_pieces(label: str) -> list[str]:
    pieces, current = [], ""
    for ch in label:
        if ch == "[" and current:
            pieces.append(current)
            current = ""
        current += ch
        if ch in _BREAK_AFTER:
            pieces.append(current)
            current = ""
    if current:
        pieces.append(current)
    return pieces


def _piece_width(piece: str) -> int:
    from rich.cells import cell_len

    return cell_len(piece.rstrip(" "))


def wrap_header(label: str, width: int) -> str:
    """``label`` on lines of at most ``width`` cells, broken at spaces, after ``._-/`` or before
    ``[``; a piece longer than the width is folded. Nothing is ever cut off."""
    from rich.cells import cell_len, chop_cells

    lines, line = [], ""
    for piece in _header_pieces(label):
        if line and _piece_width(line + piece) > width:
            lines.append(line.rstrip(" "))
            line = ""
        if _piece_width(piece) > width:  # fold a piece too long for any line
            chunks = chop_cells(piece.rstrip(" "), width)
            lines.extend(chunks[:-1])
            piece = chunks[-1]
        line += piece
    if line.strip():
        lines.append(line.rstrip(" "))
    return "\n".join(lines) if all(cell_len(x) <= width for x in lines) else label


def shorten_middle(text: str, width: int, head: int | None = None) -> str:
    """``text`` in at most ``width`` cells, its middle replaced by ``…`` (``head`` cells kept at the start)."""
    from rich.cells import cell_len, set_cell_size

    if cell_len(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    keep = width - 1
    head = keep // 2 if head is None else max(0, min(head, keep))
    start = set_cell_size(text, head).rstrip() if head else ""
    end, tail = "", keep - cell_len(start)
    for ch in reversed(text):  # the last ``tail`` cells
        if cell_len(ch + end) > tail:
            break
        end = ch + end
    return f"{start}…{end}"


def shorten_unique(texts: list[str], width: int) -> list[str]:
    """Each text shortened from the middle to ``width`` cells, the cut moved so that texts that
    differ still read differently (when some split allows it)."""
    keep = width - 1
    for head in sorted(range(keep + 1), key=lambda h: abs(h - keep // 2)):
        short = [shorten_middle(t, width, head) for t in texts]
        if len(set(short)) == len(set(texts)):
            return short
    return [shorten_middle(t, width) for t in texts]


def fitted_table(title: str, headers: list[str], rows: list[list[str]], width: int, *, shrink: int | None = None,
                 justify: list[str] | None = None) -> Table:
    """A rich Table of plain-text ``rows`` planned to fit ``width`` cells (see the comment above).

    ``shrink``: the index of the name column that may be shortened. Columns that still do not fit
    are left out from the right; the table's caption names them."""
    from rich.cells import cell_len

    n = len(headers)
    justify = justify or ["left" if i == shrink else "right" for i in range(n)]
    need = [max([cell_len(r[i]) for r in rows] or [0]) for i in range(n)]
    header_min = [min(max(_piece_width(p) for p in _header_pieces(h)), 12) for h in headers]
    w = [max(need[i], header_min[i], 1) for i in range(n)]
    keep = list(range(n))

    def over() -> int:  # no outer frame and no padding at the edges: 3 cells between columns
        return sum(w[i] for i in keep) + 3 * (len(keep) - 1) - width

    if over() > 0 and shrink is not None:
        w[shrink] = max(min(w[shrink], max(NAME_FLOOR, header_min[shrink])), w[shrink] - over())
    dropped = []
    while over() > 0 and len(keep) > 2:
        i = next(i for i in reversed(keep) if i not in (0, shrink))
        keep.remove(i)
        dropped.append(headers[i])
    spare = -over()
    for i in keep:  # room left: headers on one line where it fits
        extra = cell_len(headers[i]) - w[i]
        if 0 < extra <= spare:
            w[i] += extra
            spare -= extra
    if shrink is not None and need[shrink] > w[shrink] and spare > 0:
        w[shrink] += min(spare, need[shrink] - w[shrink])
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for i in keep:
        table.add_column(escape(wrap_header(headers[i], w[i])), justify=justify[i], width=w[i], no_wrap=True)
    short = shorten_unique([r[shrink] for r in rows], w[shrink]) if shrink is not None else None
    for k, r in enumerate(rows):
        table.add_row(*[escape(short[k] if i == shrink else r[i]) for i in keep])
    if dropped:
        table.caption = f"not shown at this width ({width} columns): {', '.join(dropped)}; see --out"
        table.caption_justify = "left"
    return table


def print_info(anatomy: "Anatomy", label: str, fmt: str, console: Console | None = None) -> None:
    console = console or Console()
    d = anatomy.dims
    table = Table(title=f"{label}", show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value")
    table.add_row("family", anatomy.family)
    table.add_row("format", fmt)
    tied_note = " (tied LM head counted once)" if anatomy.tied_head_entries() else ""
    table.add_row("parameters", f"{human_count(anatomy.parameter_count)} ({anatomy.parameter_count:,}) "
                                f"floating-point weights{tied_note}")
    buffers = anatomy.buffers()
    if buffers:
        table.add_row("buffers", "not counted as parameters: " + ", ".join(
            f"{name} ({anatomy.entries[name].dtype}, {n:,})" for name, n in buffers.items()))
    table.add_row("tensors", str(len(anatomy.entries)))
    table.add_row("dtypes", ", ".join(f"{k} ×{v}" for k, v in sorted(anatomy.dtype_counts().items())))
    if anatomy.tied_embeddings is not None:
        tied = "yes" if anatomy.tied_embeddings else "no"
    else:
        tied = "n/a (no lm_head)" if not anatomy.by_role("lm_head") else "unknown until analysed"
    table.add_row("tied embeddings", tied)
    dims = ", ".join(f"{k}={getattr(d, k)}" for k in ("n_layers", "d_model", "d_ff", "n_heads", "n_kv_heads", "head_dim", "vocab_size"))
    if d.n_experts:
        dims += f", n_experts={d.n_experts}"
    table.add_row("dims", f"{dims}  [from {d.source}]")
    if d.kv_lora_rank:
        table.add_row("latent attention", f"q_lora_rank={d.q_lora_rank}, kv_lora_rank={d.kv_lora_rank}, "
                                          f"qk_rope_head_dim={d.qk_rope_head_dim}, v_head_dim={d.v_head_dim}")
    for stack, sd in d.stacks.items():
        table.add_row(f"{stack} stack", ", ".join(f"{k}={v}" for k, v in sd.items()))
    if d.attention_layers is not None:
        table.add_row("attention layers", ", ".join(map(str, d.attention_layers)) or "none (no softmax attention)")
    if getattr(anatomy, "shared_layers", False):
        table.add_row("shared layers", f"one set of layer weights used by all {d.n_layers} layers (ALBERT)")
    table.add_row("anatomy", getattr(anatomy, "path", "names") + (" (transformers' module tree)"
                  if getattr(anatomy, "path", "") == "skeleton" else " (name rules + shapes)"))
    roles = anatomy.role_counts()
    table.add_row("roles", ", ".join(f"{r} ×{roles[r]}" for r in sorted(roles)))
    console.print(table)


def print_summary(result: "AnalysisResult", console: Console | None = None) -> None:
    """Per-layer tables of the key metrics by role, then the non-layer matrices and any errors."""
    console = console or Console()
    t = result.table
    key = [m for m in KEY_METRICS if m in t.columns][:3]
    layered = t[t["layer"].notna()]
    roles = [r for r in MATRIX_ROLE_ORDER if r in set(layered["role"])]
    for metric in key:
        if not roles:
            break
        sub = layered[layered["role"].isin(roles)]
        keys = layer_keys(sub)
        pivot = sub.groupby(keys + ["role"])[metric].mean().unstack("role")
        if pivot.isna().all().all():
            continue
        rows = [[layer_label(layer), *[_fmt(row.get(r)) for r in roles]] for layer, row in pivot.iterrows()]
        console.print(fitted_table(f"{metric} by layer and role", ["layer", *roles], rows, console.width))
    others = t[t["layer"].isna() & t["role"].isin(["embed.token", "embed.position", "embed.type", "lm_head"])]
    if len(others) and key:
        rows = [[row["name"], row["shape"], *[_fmt(row[m]) for m in key]] for _, row in others.iterrows()]
        console.print(fitted_table("embeddings and head", ["name", "shape", *map(column_label, key)], rows, console.width,
                                   shrink=0, justify=["left", "left", *["right"] * len(key)]))
    errors = t[t["error"].astype(str) != ""]
    if len(errors):
        console.print(f"[yellow]{len(errors)} row(s) with notes[/yellow] (see the 'error' column):")
        for _, row in errors.head(8).iterrows():
            console.print(escape(f"  {row['name']}: {row['error']}"))
        if len(errors) > 8:
            console.print(f"  … and {len(errors) - 8} more")
    console.print(
        f"{len(t)} rows from {len(result.anatomy.entries)} tensors in {result.seconds:.1f}s "
        f"({result.computed} computed, {result.cached} from the store {result.config.resolved_store()})"
    )


def print_heads(result, console: Console | None = None) -> None:
    """Per-layer means of the key head metrics, then the head categories made against a null."""
    from .weights.heads import head_label

    console = console or Console()
    t = result.table
    cols = {"qk_entropy_rank": "QK eff.rank", "ov_entropy_rank": "OV eff.rank", "qk_asymmetry": "QK asym",
            "ov_eig_positive_fraction": "OV λ>0", "ov_copying_score": "OV copy", "qk_spectral_norm": "QK ‖·‖₂",
            "ov_spectral_norm": "OV ‖·‖₂"}
    d = result.anatomy.dims
    groups = t.groupby(layer_keys(t) + (["attention"] if "attention" in t.columns else []), sort=False)
    rows = [[layer_label(layer), *[_fmt(float(grp[c].mean())) for c in cols]] for layer, grp in groups]
    console.print(fitted_table(f"heads: {d.n_heads} query heads, {d.n_kv_heads} kv heads, head_dim {d.head_dim} "
                               f"(per-layer means)", ["layer", *cols.values()], rows, console.width))
    cats = result.categories
    null = cats.null
    console.print(f"null: {null.draws} random heads of the same shapes give QK effective rank "
                  f"{null.qk_entropy_rank[0]:.3g} ± {null.qk_entropy_rank[1]:.2g} (of {cats.head_dim}) and OV copying "
                  f"score {null.ov_copying_score[0]:.2g} ± {null.ov_copying_score[1]:.2g}")
    fmt = lambda heads: ", ".join(head_label(l, h) for l, h in heads[:40]) + (" …" if len(heads) > 40 else "")  # noqa: E731,E741
    for name, heads, bound in cats.items():
        console.print(f"{name} heads ({bound}): {fmt(heads) if heads else 'none'}")
    if not any(heads for _, heads, _ in cats.items()):
        console.print("no head stands out from random heads by these rules")


STACK_SHORT = {"encoder": "enc", "decoder": "dec"}


def layer_keys(table) -> list[str]:
    """Group per-layer rows by (stack, layer) where a model has stacks (encoder-decoder), else by layer,
    so encoder layer 0 and decoder layer 0 are never averaged together."""
    if "stack" in table.columns and table["stack"].fillna("").nunique() > 1:
        return ["stack", "layer"]
    return ["layer"]


def layer_label(key) -> str:
    """``3`` -> "3"; ``("encoder", 0)`` -> "enc L0"; ``("decoder", 1, "cross")`` -> "dec L1 cross"."""
    if not isinstance(key, tuple):
        return str(key)
    if len(key) == 1:
        return str(key[0])
    stack, layer, *rest = key
    text = f"{STACK_SHORT.get(stack, stack)} L{layer}" if stack else str(layer)
    return text + "".join(f" {r}" for r in rest if r and r != "self")


def print_embeddings(result, console: Console | None = None) -> None:
    console = console or Console()
    for role, g in result.matrices.items():
        table = Table(title=f"{role}: {g['name']}", show_header=False, title_justify="left")
        table.add_column("key", style="bold")
        table.add_column("value")
        table.add_row("vocabulary × dim", f"{g['vocab_size']:,} × {g['dim']}" + (f" ({g['zero_rows']} zero rows skipped)" if g["zero_rows"] else ""))
        for note in g.get("notes", []):
            table.add_row("note", note)
        table.add_row("pairs", f"{g['pairs']:,}" + (f" (estimated from {g['sampled_pairs']:,} random pairs)" if g["method"] == "sample" else " (all, exact)"))
        ci = f"  95% CI [{g['mean_ci95'][0]:.4f}, {g['mean_ci95'][1]:.4f}]" if "mean_ci95" in g else ""
        table.add_row("cosine mean ± std", f"{g['mean']:.4f} ± {g['std']:.4f}{ci}")
        pct = g.get("percentiles", {})
        err = f"  (± {g['percentile_error']:.3f}: bin width)" if "percentile_error" in g else ""
        table.add_row("percentiles", ", ".join(f"{k} {_fmt(v) if v is not None else 'out of range'}" for k, v in pct.items()) + err)
        thr = g["threshold"]
        if "neighbors_per_token" in thr:
            nb = thr["neighbors_per_token"]
            table.add_row(f"neighbours (cos > {thr['value']})",
                          f"{thr['pairs_above']:,} pairs; per token mean {nb['mean']:.3g}, max {nb['max']}; "
                          f"{nb['tokens_with_neighbors']:,} tokens have one")
            hubs = ", ".join(f"{h.get('text', h['id'])!r}{UNTRAINED_MARK if h.get('untrained') else ''} ({h['neighbors']})"
                             for h in thr["top_hubs"][:10])
            table.add_row("top hub tokens", escape(hubs) or "none")
        else:
            table.add_row(f"share of pairs with cos > {thr['value']}", f"{thr['fraction_above']:.3g} ± {thr['fraction_above_ci95_halfwidth']:.2g}")
        table.add_row("isotropy ‖mean row‖ / mean ‖row‖", f"{g['isotropy']['mean_vector_norm_over_mean_norm']:.4f}")
        n = g["norms"]
        table.add_row("row norms", f"mean {n['mean']:.4g} ± {n['std']:.3g}, min {n['min']:.4g}, median {n['p50']:.4g}, max {n['max']:.4g}")
        u = g.get("untrained")
        if u:
            table.add_row("untrained-looking rows", f"{u['count']:,} ({u['by_name']:,} by name, {u['by_similarity']:,} by "
                          f"similarity to them; marked {UNTRAINED_MARK}){'; excluded' if u['excluded'] else ''}")
        for word, near in g.get("nearest", {}).items():
            table.add_row(escape(f"nearest to {word!r}"), escape(", ".join(
                f"{x['text']!r}{UNTRAINED_MARK if x.get('untrained') else ''} {x['cosine']:.3f}" for x in near)))
        console.print(table)


def print_clusters(result, console: Console | None = None) -> None:
    console = console or Console()
    for role, r in result.matrices.items():
        scores = {s["k"]: s for s in r["scores"]}
        chosen = scores[r["chosen_k"]]
        console.print(f"[bold]{role}[/bold] {escape(r['name'])}: k = {r['chosen_k']} by {r['selection']} "
                      f"(CH {chosen['calinski_harabasz']:.4g}, silhouette {chosen['silhouette']:.3f}; "
                      f"tried {', '.join(map(str, r['k_candidates']))})")
        fit = r.get("fit") or {}
        if fit.get("sampled"):
            pcs = f" (on its top {fit['pca_components']} principal components)" if fit.get("pca_components") else ""
            console.print(f"k chosen from fits on a seeded {fit['sample_rows']:,}-row sample{pcs}; the chosen k "
                          f"fitted on all {fit['rows']:,} rows in {fit['refine_iterations']} Lloyd iterations")
        console.print(escape(cluster_verdict_text(r)))
        for note in r.get("notes", []):
            console.print(escape(f"note: {note}"))
        table = Table(title_justify="left")
        table.add_column("cluster", justify="right")
        table.add_column("size", justify="right")
        table.add_column("tokens nearest the centre")
        for c in r["clusters"][:30]:
            marks = c.get("untrained") or [False] * len(c["text"])
            table.add_row(str(c["cluster"]), f"{c['size']:,}", escape(", ".join(
                repr(t) + (UNTRAINED_MARK if u else "") for t, u in zip(c["text"], marks))))
        console.print(table)
        u = r.get("untrained")
        if u and u["count"]:
            console.print(f"{UNTRAINED_MARK} untrained-looking row ({u['count']:,} in this vocabulary"
                          f"{', excluded from the clustering' if u['excluded'] else ''})")


def cluster_verdict_text(r: dict) -> str:
    """The clusters' verdict in words, by the stated rule (weights.clusters.VERDICT_RULE)."""
    from .weights.clusters import ELBOW_RATIO, SILHOUETTE_MIN

    v = r["verdict"]
    if v["structure"]:
        text = (f"cluster structure: best silhouette {v['best_silhouette']:.3f} at k = {v['best_silhouette_k']} "
                f"(≥ {SILHOUETTE_MIN:g}).")
    else:
        text = (f"no clear cluster structure at these k: the best silhouette is {v['best_silhouette']:.3f} "
                f"(k = {v['best_silhouette_k']}), below {SILHOUETTE_MIN:g}; the clusters are a partition, not groups.")
    ratio = v["elbow_ratio"]
    if v["elbow_claimed"]:
        text += f" Elbow at k = {r['elbow_k']} (inertia falls {ratio:.3g}× faster before it than after)."
    else:
        shown = f"{ratio:.2f}×" if ratio == ratio else "undefined"
        text += (f" No elbow: the sharpest bend (k = {r['elbow_k']}) changes the slope by {shown}, "
                 f"less than the {ELBOW_RATIO:g}× required.")
    return text


def _role_table(title: str, frame: "pd.DataFrame", columns: list[str], width: int) -> Table:
    """Per role: number of matrices and the mean of each column (a tied matrix counts once)."""
    import pandas as pd

    order = [r for r in MATRIX_ROLE_ORDER if r in set(frame["role"])] + sorted(
        r for r in set(frame["role"]) if r not in MATRIX_ROLE_ORDER)
    rows = []
    for role in order:
        sub = frame[frame["role"] == role]
        tied = "tied" in sub and (sub["tied"].astype(str) != "").all()
        rows.append([f"{role}*" if tied else role, str(len(sub)),
                     *[_fmt(pd.to_numeric(sub[c], errors="coerce").mean()) for c in columns]])
    return fitted_table(title, ["role", "n", *map(column_label, columns)], rows, width, shrink=0)


def _tied_note(rows: "pd.DataFrame") -> str | None:
    """One line naming the matrices saved under two names (compare shows each once, marked ``*``)."""
    if "tied" not in rows:
        return None
    ties = [f"{name} = {tied}" for name, tied in zip(rows["name"], rows["tied"]) if isinstance(tied, str) and tied]
    return f"* tied: {'; '.join(ties)} (one matrix saved under two names, shown once)" if ties else None


def print_compare(result, console: Console | None = None) -> None:
    """Mismatches, drift by role, the most changed matrices, token drift and task vectors."""
    console = console or Console()
    for label, problems in result.mismatch.items():
        console.print(f"[yellow]{escape(result.reference)} vs {escape(label)}: not everything matches[/yellow]")
        for p in problems:
            console.print(escape(f"  {p}"))
    cols = [c for c in ("rel_change", "cosine", "procrustes_cosine", "delta_entropy_rank", "delta_stable_rank",
                        "delta_alpha") if c in result.table.columns]
    for label in result.models:
        rows = result.table[(result.table["model"] == label) & result.table["shape"].str.contains("×")]
        console.print(_role_table(f"drift {result.reference} → {label}, mean by role", rows, cols, console.width))
        top = rows.sort_values("rel_change", ascending=False).head(8)
        shown = [[row["name"] + ("*" if isinstance(row.get("tied"), str) and row.get("tied") else ""),
                  *[_fmt(row[c]) for c in cols[:3]]] for _, row in top.iterrows()]
        console.print(fitted_table("most changed matrices", ["name", *map(column_label, cols[:3])], shown, console.width,
                                   shrink=0))
        note = _tied_note(rows)
        if note:
            console.print(escape(note))
        tok = result.tokens.get(label)
        if tok:
            console.print(f"token drift ({tok['tokens']:,} tokens, Procrustes-aligned): mean cosine {_fmt(tok['mean_cosine'])}, "
                          f"median {_fmt(tok['median_cosine'])}, 10th percentile {_fmt(tok['p10_cosine'])}, "
                          f"mean distance {_fmt(tok['mean_distance'])}")
            for key, title in (("most_drifted", "most drifted"), ("least_drifted", "least drifted")):
                shown = ", ".join(f"{t['text']!r} {t['cosine']:.2f}" for t in tok[key][:12])
                console.print(escape(f"  {title}: {shown}"))
        _print_layer_cka(result, label, rows, console)
    tv = result.task_vectors
    if tv is not None and len(tv):
        cols = [c for c in tv.columns if c.startswith(("norm[", "cosine[", "sign_conflict"))]
        console.print(_role_table(f"task vectors (model − {result.reference}), mean by role", tv, cols, console.width))


def _print_layer_cka(result, label: str, rows: "pd.DataFrame", console: Console) -> None:
    """Per layer: CKA of the two models' hidden states on the same tokens, beside the layer's drift."""
    import pandas as pd

    cka = getattr(result, "cka", None)
    if cka is None or not (cka["model"] == label).any():
        return
    drift = rows.groupby("layer")["rel_change"].mean() if len(rows) else pd.Series(dtype=float)
    for data, part in cka[cka["model"] == label].groupby("data", sort=False):
        shown = [["embeddings" if pd.isna(r.layer) else f"block {int(r.layer)}", _fmt(float(r.cka)),
                  "—" if pd.isna(r.layer) else _fmt(float(drift.get(int(r.layer), math.nan)))] for r in part.itertuples()]
        console.print(fitted_table(f"debiased linear CKA {result.reference} vs {label}, same tokens ({data})",
                                   ["output of", "cka", "mean rel change"], shown, console.width, shrink=0))


def print_trajectory(result, console: Console | None = None) -> None:
    """Per checkpoint: global drift and mean ranks; then where the run was still moving at the end."""
    console = console or Console()
    summary = result.summary()
    columns = list(summary.columns)
    rows = [[str(row[c]) if c == "checkpoint" else _fmt(row[c]) for c in columns] for _, row in summary.iterrows()]
    console.print(fitted_table(f"trajectory over {len(result.checkpoints)} checkpoints", [column_label(c) for c in columns],
                               rows, console.width, shrink=columns.index("checkpoint") if "checkpoint" in columns else None))
    last = result.table[result.table["step"] == result.table["step"].max()]
    moving = last[last["shape"].str.contains("×")].dropna(subset=["drift_prev_rel_change"])
    if len(moving):
        top = moving.sort_values("drift_prev_rel_change", ascending=False).head(5)
        shown = ", ".join(f"{n} {v:.3g}" for n, v in zip(top["name"], top["drift_prev_rel_change"]))
        console.print(escape(f"still moving most at the last checkpoint (change from the previous): {shown}"))
    for reason in result.skipped:
        console.print(f"[yellow]skipped unreadable checkpoint[/yellow] {escape(reason)}")
    console.print(f"{result.computed} matrices computed, {result.cached} from the store")


class ProgressDisplay:
    """One progress display (on stderr) with a bar per named task, ETA included; it appears with
    the first update, so an error that comes before any progress prints alone."""

    def __init__(self, label: str, quiet: bool = False):
        self.label, self.quiet = label, quiet
        self.progress = None
        self.tasks: dict[str, object] = {}

    def update(self, name: str, done: int, total: int, current: str | None = None) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        if self.progress is None:
            self.progress = Progress(TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                     TextColumn("{task.fields[current]}"), console=Console(stderr=True),
                                     disable=self.quiet)
            self.progress.start()
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(name, total=total, current=name[-48:])
        self.progress.update(self.tasks[name], completed=done, total=total,
                             **({"current": current[-48:]} if current else {}))

    def __enter__(self) -> "ProgressDisplay":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()
