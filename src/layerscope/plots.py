"""Figures (matplotlib, Agg backend, PNG): head maps, eigenvalues, spectra curves, histograms.

Every figure has a title, labelled axes and a colour bar or legend, and is saved at a size that
is legible when opened as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


HEAD_MAP_METRICS = {
    "qk_entropy_rank": "QK effective rank (entropy)",
    "ov_entropy_rank": "OV effective rank (entropy)",
    "qk_spectral_norm": "QK spectral norm",
    "ov_spectral_norm": "OV spectral norm",
    "qk_asymmetry": "QK asymmetry ‖A−Aᵀ‖/‖A‖",
    "ov_eig_positive_fraction": "OV share of eigenvalues with Re>0 (copying)",
    "ov_copying_score": "OV copying score ΣRe λ / Σ|λ|",
}
#: The maps the report shows (the others are written only by ``layerscope heads --plot``).
REPORT_HEAD_METRICS = ("qk_entropy_rank", "ov_entropy_rank", "qk_asymmetry", "ov_copying_score")


def head_scale(metric: str, values: np.ndarray, head_dim: int | None = None) -> tuple[str, float, float]:
    """(colour map, vmin, vmax): one fixed scale per metric, from what the metric can be.

    Ranks run from 0 to head_dim, shares from 0 to 1, the asymmetry from 0 to √2 (its maximum), the
    signed copying score on a diverging map from −1 to 1 centred at 0; norms from 0 to their largest
    value. A scale fitted to each map's own range would make tiny differences look large.
    """
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size else 1.0
    if metric.endswith("entropy_rank") or metric.endswith("energy_rank_99"):
        return "viridis", 0.0, float(head_dim) if head_dim else top
    if metric.endswith("fraction"):
        return "viridis", 0.0, 1.0
    if metric == "qk_asymmetry":
        return "viridis", 0.0, float(np.sqrt(2.0))
    if metric.endswith("copying_score"):
        return "RdBu_r", -1.0, 1.0
    return "viridis", 0.0, top if top > 0 else 1.0


def _head_row_labels(table: pd.DataFrame) -> tuple[list[str], list[str]]:
    """One heatmap row per attention module: "L3", or "enc L3" / "dec L3" / "dec L3 cross" when the
    table has stacks (an encoder-decoder's layer 3 has up to three attention modules). Returns the
    label of each table row and the distinct labels in display order (by stack, then layer)."""
    keys = [c for c in ("stack", "layer", "attention") if c in table.columns]
    rank = {"stack": {"encoder": 0, "decoder": 1}, "attention": {"self": 0, "cross": 1}}
    order = table.sort_values(keys, kind="stable", key=lambda c: c.map(rank[c.name]).fillna(0) if c.name in rank else c)
    labels = {}
    for idx, r in order.iterrows():
        stack = str(r["stack"])[:3] + " " if "stack" in table.columns and isinstance(r["stack"], str) and r["stack"] else ""
        cross = " cross" if "attention" in table.columns and r.get("attention") == "cross" else ""
        labels[idx] = f"{stack}L{int(r['layer'])}{cross}"
    return [labels[i] for i in table.index], list(dict.fromkeys(labels.values()))


def head_heatmaps(table: pd.DataFrame, directory: str | Path, title: str = "",
                  metrics: Sequence[str] | None = None, head_dim: int | None = None) -> list[Path]:
    """One layer × head heatmap per head metric (``metrics``: all of HEAD_MAP_METRICS by default),
    each on its metric's fixed colour scale (``head_scale``); rows are labelled L0, L1 …, columns H0, H1 …"""
    plt = _plt()
    out = []
    for metric in metrics or HEAD_MAP_METRICS:
        if metric not in table:
            continue
        label = HEAD_MAP_METRICS.get(metric, metric)
        rows, shown = _head_row_labels(table)
        grid = table.assign(_row=rows).pivot(index="_row", columns="head", values=metric).loc[shown]
        values = grid.to_numpy(dtype=float)
        cmap, vmin, vmax = head_scale(metric, values, head_dim)
        fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * grid.shape[1] + 2), max(3.0, 0.4 * grid.shape[0] + 1.5)))
        im = ax.imshow(values, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, origin="upper")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(grid.shape[1]), [f"H{c}" for c in grid.columns], fontsize=8)
        ax.set_yticks(range(grid.shape[0]), list(grid.index))
        ax.set_title(f"{label}{' — ' + title if title else ''}")
        fig.colorbar(im, ax=ax, label=label)
        out.append(_save(fig, Path(directory) / f"heads_{metric}.png"))
    return out


def head_eigenvalues(table: pd.DataFrame, selected: Iterable[tuple[int, int]], directory: str | Path,
                     title: str = "") -> Path:
    """Top eigenvalues of the QK and OV circuits of selected heads in the complex plane."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    colors = plt.get_cmap("tab10")
    for i, (layer, head) in enumerate(selected):
        row = table[(table["layer"] == layer) & (table["head"] == head)]
        if row.empty:
            continue
        row = row.iloc[0]
        for ax, circuit in zip(axes, ("qk", "ov")):
            eig = np.array(row[f"{circuit}_top_eigs"], dtype=float).reshape(-1, 2)
            ax.scatter(eig[:, 0], eig[:, 1], s=28, color=colors(i % 10), label=f"L{layer} H{head}", alpha=0.85)
    for ax, circuit in zip(axes, ("QK", "OV")):
        ax.axhline(0, color="grey", lw=0.6)
        ax.axvline(0, color="grey", lw=0.6)
        ax.set_xlabel("Re λ")
        ax.set_ylabel("Im λ")
        ax.set_title(f"{circuit} circuit: largest eigenvalues")
    axes[1].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    return _save(fig, Path(directory) / "heads_eigenvalues.png")


def explained_variance_curves(curves: Sequence[tuple[str, np.ndarray]], directory: str | Path,
                              title: str = "MLP down-projection: cumulative explained variance") -> Path:
    """One line per layer: Σ_{i≤k} σ_i² / Σ σ² against k / min(m, n)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    cmap = plt.get_cmap("viridis")
    for i, (label, cum) in enumerate(curves):
        x = np.arange(1, len(cum) + 1) / len(cum)
        ax.plot(x, cum, color=cmap(i / max(1, len(curves) - 1)), lw=1.4, label=label)
    ax.set_xlabel("fraction of singular values kept (k / min(m, n))")
    ax.set_ylabel("cumulative explained variance Σσ²")
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2 if len(curves) > 8 else 1)
    return _save(fig, Path(directory) / "mlp_down_explained_variance.png")


def cosine_histogram(geometry: dict, directory: str | Path, name: str) -> Path:
    """Histogram of all-pairs cosine similarity, log-scaled counts, threshold marked."""
    plt = _plt()
    h = geometry["histogram"]
    edges, counts = np.array(h["edges"]), np.array(h["counts"], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4477aa", edgecolor="none")
    ax.set_yscale("log")
    ax.axvline(geometry["threshold"]["value"], color="#cc3311", lw=1, ls="--", label=f"threshold {geometry['threshold']['value']}")
    ax.axvline(geometry["mean"], color="black", lw=1, label=f"mean {geometry['mean']:.3f}")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("token pairs (log scale)")
    ax.set_title(f"All-pairs cosine similarity — {name} ({geometry['vocab_size']:,} tokens)")
    ax.legend()
    return _save(fig, Path(directory) / f"cosine_histogram_{name.replace('.', '_')}.png")


def selection_curve(scores: pd.DataFrame, chosen_k: int, directory: str | Path, name: str) -> Path:
    """Calinski–Harabasz, silhouette and inertia against k, the chosen k marked."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, col, label in zip(axes, ("calinski_harabasz", "silhouette", "inertia"),
                              ("Calinski–Harabasz (higher is better)", "silhouette on a sample", "inertia (elbow)")):
        ax.plot(scores["k"], scores[col], marker="o", ms=3)
        ax.axvline(chosen_k, color="#cc3311", ls="--", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(scores["k"], [str(k) for k in scores["k"]], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("k (clusters)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Choosing k for {name}: k = {chosen_k}", y=1.04)
    return _save(fig, Path(directory) / f"clusters_selection_{name.replace('.', '_')}.png")


def _role_colours(roles: Sequence[str]) -> dict[str, str]:
    """One fixed colour per weight type, the same in every figure."""
    palette = {"attn.q": "#4477aa", "attn.k": "#66ccee", "attn.v": "#228833", "attn.o": "#ccbb44",
               "attn.qkv": "#0077bb", "mlp.gate": "#ee6677", "mlp.up": "#aa3377", "mlp.down": "#ee7733",
               "mlp.gate_up": "#cc3311", "embed.token": "#000000", "embed.position": "#777777", "lm_head": "#996633"}
    extra = iter(["#332288", "#88ccee", "#44aa99", "#117733", "#999933", "#ddcc77", "#cc6677", "#882255"])
    return {r: palette.get(r) or next(extra, "#444444") for r in roles}


def drift_by_layer(table: pd.DataFrame, directory: str | Path, title: str) -> Path:
    """rel_change and Procrustes cosine against layer, one line per weight type."""
    plt = _plt()
    rows = table[table["layer"].notna() & table["shape"].astype(str).str.contains("×")]
    roles = [r for r in rows["role"].unique()]
    colours = _role_colours(roles)
    panels = [c for c in ("rel_change", "procrustes_cosine") if c in rows and rows[c].notna().any()]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    labels = {"rel_change": "relative change ‖B−A‖/‖A‖", "procrustes_cosine": "cosine after Procrustes alignment"}
    for ax, col in zip(axes[0], panels):
        for role in roles:
            r = rows[rows["role"] == role].groupby("layer")[col].mean()
            ax.plot(r.index.astype(int), r.values, marker="o", ms=3, lw=1.4, color=colours[role], label=role)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_ylabel(labels[col])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, Path(directory) / "drift_by_layer.png")


def metric_over_steps(table: pd.DataFrame, metric: str, directory: str | Path, title: str = "") -> Path:
    """``metric`` against training step: one panel per weight type, one line per layer (colour = depth)."""
    from .views import MATRIX_ROLE_ORDER

    plt = _plt()
    rows = table[table["layer"].notna() & table["shape"].astype(str).str.contains("×") & table[metric].notna()]
    roles = [r for r in MATRIX_ROLE_ORDER if r in set(rows["role"])] or sorted(set(rows["role"]))
    ncols = min(4, max(1, len(roles)))
    nrows = max(1, -(-len(roles) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.9 * ncols + 1.2, 3.1 * nrows + 0.6), squeeze=False,
                             layout="constrained")
    cmap = plt.get_cmap("viridis")
    layers = sorted(int(x) for x in rows["layer"].unique()) if len(rows) else [0]
    span = max(1, layers[-1] - layers[0])
    for i, (ax, role) in enumerate(zip(axes.flat, roles)):
        sub = rows[rows["role"] == role].pivot_table(index="step", columns="layer", values=metric, aggfunc="mean")
        for layer in sub.columns:
            ax.plot(sub.index, sub[layer], lw=1.3, marker="o", ms=2.5, color=cmap((int(layer) - layers[0]) / span),
                    label=f"layer {int(layer)}")
        ax.set_title(role, fontsize=10)
        ax.grid(alpha=0.3)
        if i % ncols == 0:
            ax.set_ylabel(metric)
        if i >= len(roles) - ncols:
            ax.set_xlabel("training step")
    for ax in list(axes.flat)[len(roles):]:
        ax.set_visible(False)
    if len(layers) <= 8:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right center", fontsize=8, title="layer (colour = depth)")
    else:
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(layers[0], layers[-1]))
        fig.colorbar(sm, ax=axes.ravel().tolist(), label="layer", shrink=0.8)
    fig.suptitle(title or f"{metric} over training, per weight type and layer")
    return _save(fig, Path(directory) / f"trajectory_{metric}.png")


def metric_by_layer(tables: dict[str, pd.DataFrame], metric: str, directory: str | Path, label: str) -> Path:
    """``metric`` against layer, one line per weight type (fixed colours); one panel per model."""
    from .report.depth import MATH_LABELS, layer_series, layered_roles

    plt = _plt()
    n = len(tables)
    fig, axes = plt.subplots(1, n, figsize=(max(7.0, 5.2 * n), 4.4), squeeze=False, sharey=True, layout="constrained")
    all_roles = list(dict.fromkeys(r for t in tables.values() for r in layered_roles(t)))
    colours = _role_colours(all_roles)
    for ax, (name, table) in zip(axes[0], tables.items()):
        for role in layered_roles(table):
            s = layer_series(table, role, metric)
            if len(s):
                ax.plot(s.index, s.values, marker="o", ms=3.5, lw=1.6, color=colours[role], label=role)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if n > 1:
            ax.set_title(name, fontsize=10)
    label = MATH_LABELS.get(metric, label)  # mathtext in the figure, words in the report's headings
    axes[0][0].set_ylabel(label)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right center", fontsize=9, title="weight type")
    fig.suptitle(f"{label} by layer")
    return _save(fig, Path(directory) / f"depth_{metric}.png")


# -- loss landscapes ------------------------------------------------------------------------------
def landscape_line(result, directory: str | Path) -> Path:
    """L(α) between two checkpoints, the straight line between the end losses, and the barrier."""
    plt = _plt()
    t = result.table.sort_values("alpha")
    s = result.summary
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(t["alpha"], t["loss"], "o-", ms=3, label="L(α)")
    ax.plot([0, 1], [s["loss_start"], s["loss_end"]], "--", color="grey", label="(1−α)L(0) + αL(1)")
    a = s["barrier_alpha"]
    base = (1 - a) * s["loss_start"] + a * s["loss_end"]
    if s["barrier"] > 0:
        ax.annotate("", xy=(a, base + s["barrier"]), xytext=(a, base), arrowprops=dict(arrowstyle="<->", color="C3"))
        ax.text(a, base + s["barrier"] / 2, f"  barrier {s['barrier']:.3g}" + ("" if s["has_barrier"] else " (not significant)"),
                color="C3", va="center")
    ax.axvline(0, color="black", lw=0.5)
    ax.axvline(1, color="black", lw=0.5)
    ax.set_xlabel(f"α  (0: {result.labels[0]},  1: {result.labels[1]})")
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.set_title("linear interpolation between checkpoints")
    ax.legend()
    return _save(fig, Path(directory) / "landscape_1d.png")


def landscape_plane(result, directory: str | Path) -> list[Path]:
    """Contour and surface plots of a 2-D landscape (the checkpoints marked on a plane)."""
    plt = _plt()
    xs, ys, z = result.grid()
    what = {"random": "filter-normalised random directions", "hessian": "top-2 Hessian eigenvectors",
            "plane": "plane through three checkpoints"}.get(result.kind, result.kind)
    fig, ax = plt.subplots(figsize=(6.2, 5.2))
    levels = np.linspace(np.nanmin(z), np.nanmin(z) + min(np.nanmax(z) - np.nanmin(z), 4 * (np.nanmedian(z) - np.nanmin(z)) + 1e-9), 30)
    cs = ax.contourf(xs, ys, z, levels=levels, cmap="viridis", extend="max")
    ax.contour(xs, ys, z, levels=levels[::3], colors="white", linewidths=0.5)
    fig.colorbar(cs, ax=ax, label="loss")
    marks = result.marks or {result.labels[0]: (0.0, 0.0)}
    for label, (mx, my) in marks.items():
        ax.plot([mx], [my], "r*", ms=10)
        ax.annotate(f" {label}", (mx, my), color="red")
    ax.set_xlabel("direction 1" if result.kind != "plane" else "u (θ₂ − θ₁)")
    ax.set_ylabel("direction 2" if result.kind != "plane" else "v (θ₃ − θ₁, orthogonalised)")
    ax.set_title(f"loss contours — {what}")
    ax.set_aspect("equal", adjustable="box")
    contour = _save(fig, Path(directory) / f"landscape_{result.kind}_contour.png")
    fig = plt.figure(figsize=(6.4, 5.2))
    ax3 = fig.add_subplot(projection="3d")
    gx, gy = np.meshgrid(xs, ys)
    ax3.plot_surface(gx, gy, np.minimum(z, levels[-1]), cmap="viridis", linewidth=0, antialiased=True)
    ax3.set_xlabel("direction 1")
    ax3.set_ylabel("direction 2")
    ax3.set_zlabel("loss")
    ax3.set_title(f"loss surface — {what}")
    surface = _save(fig, Path(directory) / f"landscape_{result.kind}_surface.png")
    return [contour, surface]
