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


def head_heatmaps(table: pd.DataFrame, directory: str | Path, title: str = "") -> list[Path]:
    """One layer × head heatmap per key head metric."""
    plt = _plt()
    out = []
    for metric, label in HEAD_MAP_METRICS.items():
        if metric not in table:
            continue
        grid = table.pivot(index="layer", columns="head", values=metric).sort_index()
        fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * grid.shape[1] + 2), max(3.0, 0.4 * grid.shape[0] + 1.5)))
        im = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="viridis", origin="upper")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [str(i) for i in grid.index])
        ax.set_title(f"{label}{' — ' + title if title else ''}")
        fig.colorbar(im, ax=ax, label=metric)
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
            ax.scatter(eig[:, 0], eig[:, 1], s=28, color=colors(i % 10), label=f"L{layer}.H{head}", alpha=0.85)
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
