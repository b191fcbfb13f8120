"""Probe figures, drawn with ``layerscope.plots``' helpers (same backend, sizes and saving)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..plots import _plt, _save
from .lanczos import Density


def hessian_density(density: Density, directory: str | Path, title: str = "", top: float | None = None,
                    bottom: float | None = None) -> Path:
    """The SLQ spectral density (Gaussian-smoothed, log scale), each run's nodes as ticks."""
    plt = _plt()
    nodes = np.concatenate(density.nodes)
    lo, hi = float(nodes.min()), float(nodes.max())
    if bottom is not None:
        lo = min(lo, bottom)
    if top is not None:
        hi = max(hi, top)
    span = max(hi - lo, 1e-12)
    grid = np.linspace(lo - 0.05 * span, hi + 0.05 * span, 800)
    sigma = 0.01 * span
    dens = density.smoothed(grid, sigma)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.semilogy(grid, np.maximum(dens, 1e-12), color="#1f77b4", label=f"SLQ, {len(density.nodes)} runs × {density.steps} steps")
    for t in density.nodes:
        ax.plot(t, np.full_like(t, max(dens.max(), 1e-12) * 1.5), "|", color="#7f7f7f", markersize=6, alpha=0.6)
    if top is not None:
        ax.axvline(top, color="#d62728", linestyle="--", linewidth=1, label=f"λ_max = {top:.4g}")
    if bottom is not None:
        ax.axvline(bottom, color="#2ca02c", linestyle="--", linewidth=1, label=f"λ_min = {bottom:.4g}")
    ax.set_ylim(bottom=max(dens.max(), 1e-12) * 1e-6)
    ax.set_xlabel("eigenvalue of the Hessian")
    ax.set_ylabel(f"density (Gaussian σ = {sigma:.2g})")
    ax.set_title("Hessian spectral density" + (f" — {title}" if title else ""))
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, Path(directory) / "hessian_density.png")


def block_curvature(blocks: pd.DataFrame, directory: str | Path, title: str = "") -> Path:
    """Per-layer top eigenvalue and trace of the layer blocks of the Hessian (± 1 standard error)."""
    plt = _plt()
    layers = blocks[(blocks["kind"] == "layer") & blocks["layer"].notna()].sort_values("layer")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x = layers["layer"].astype(int).to_numpy()
    axes[0].plot(x, layers["top_eigenvalue"], "o-", color="#d62728")
    axes[0].set_ylabel("top eigenvalue of the layer's block")
    axes[1].errorbar(x, layers["trace"], yerr=layers["trace_std_error"], fmt="o-", color="#1f77b4", capsize=3)
    axes[1].set_ylabel("trace of the layer's block (± 1 s.e.)")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.set_xticks(x)
    fig.suptitle("Curvature per layer" + (f" — {title}" if title else ""))
    return _save(fig, Path(directory) / "hessian_layers.png")
