"""Figures of ``layerscope activations``: head-behaviour heatmaps (layer × head, like ``heads``' weight
heatmaps), the logit lens by layer, the layer × layer CKA heatmap and representation geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np

BEHAVIOUR_MAPS = {"prev_token": "previous-token score", "induction": "induction score (random repeated tokens)",
                  "duplicate_token": "duplicate-token score", "first_token_share": "first-token (sink) share",
                  "attention_entropy": "attention entropy (nats)"}


def behaviour_heatmaps(heads, directory: str | Path, title: str = "") -> list[Path]:
    from ..plots import _plt, _save

    plt = _plt()
    out = []
    for metric, label in BEHAVIOUR_MAPS.items():
        if metric not in heads:
            continue
        grid = heads.pivot(index="layer", columns="head", values=metric).sort_index()
        fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * grid.shape[1] + 2), max(3.0, 0.4 * grid.shape[0] + 1.5)))
        vmax = None if metric == "attention_entropy" else 1.0
        im = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="magma", origin="upper", vmin=0, vmax=vmax)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [str(i) for i in grid.index])
        ax.set_title(f"{label}{' — ' + title if title else ''}")
        fig.colorbar(im, ax=ax, label=metric)
        out.append(_save(fig, Path(directory) / f"behaviour_{metric}.png"))
    return out


def lens_plot(lens, directory: str | Path, title: str = "", entropy_next: float | None = None) -> Path:
    from ..plots import _plt, _save

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    x = lens["layer"].to_numpy()
    axes[0].plot(x, lens["loss"], "o-", label="cross-entropy")
    axes[0].plot(x, lens["entropy"], "s--", label="entropy of the prediction")
    if entropy_next is not None:
        axes[0].axhline(entropy_next, color="grey", lw=0.8, label="H(next token), unigram")
    axes[0].set_ylabel("nats")
    axes[0].legend(fontsize=8)
    axes[1].plot(x, lens["kl_to_final"], "o-", color="C3")
    axes[1].set_ylabel("KL(final ‖ layer), nats")
    axes[2].plot(x, lens["top1_agreement"], "o-", color="C2", label="top-1 = final's")
    axes[2].plot(x, lens["top1_accuracy"], "s--", color="C4", label="top-1 = next token")
    axes[2].set_ylim(0, 1.02)
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("layer (0 = embeddings)")
    fig.suptitle(f"logit lens{' — ' + title if title else ''}")
    return _save(fig, Path(directory) / "logit_lens.png")


def cka_heatmap(cka: np.ndarray, directory: str | Path, title: str = "") -> Path:
    from ..plots import _plt, _save

    plt = _plt()
    n = len(cka)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * n + 2.5), max(3.5, 0.35 * n + 2)))
    im = ax.imshow(cka, cmap="viridis", vmin=0, vmax=1, origin="upper")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("layer")
    ticks = range(0, n, max(1, n // 16))
    ax.set_xticks(list(ticks))
    ax.set_yticks(list(ticks))
    ax.set_title(f"debiased linear CKA{' — ' + title if title else ''}")
    fig.colorbar(im, ax=ax)
    return _save(fig, Path(directory) / "cka_layers.png")


def representation_plot(reps, directory: str | Path, title: str = "") -> Path:
    from ..plots import _plt, _save

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    x = reps["layer"].to_numpy()
    for ax, col, label in zip(axes, ("norm_mean", "anisotropy", "effective_rank"),
                              ("mean ‖h‖", "anisotropy (mean pairwise cosine)", "effective rank of the covariance")):
        ax.plot(x, reps[col], "o-")
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_ylabel(label)
    axes[0].set_yscale("log")
    fig.suptitle(f"hidden states{' — ' + title if title else ''}")
    return _save(fig, Path(directory) / "representations.png")


def activation_figures(result, directory: str | Path) -> list[Path]:
    title = result.model.label.rsplit("/", 1)[-1]
    paths = behaviour_heatmaps(result.heads, directory, title)
    if result.lens is not None:
        paths.append(lens_plot(result.lens, directory, title, result.summary.get("next_token_entropy")))
    if len(result.cka):
        paths.append(cka_heatmap(result.cka, directory, title))
    paths.append(representation_plot(result.representations, directory, title))
    return paths
