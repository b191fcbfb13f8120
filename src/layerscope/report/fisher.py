"""The report's Fisher section: which Fisher, its trace and top eigenvalues, per-layer Fisher, the
per-head heatmap, the pruning curves and dataset overlaps (from a ``FisherResult``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from .document import Figure, Items, Section, TableBlock, Text

KIND_TEXT = {"empirical": "empirical Fisher (gradients at the data's targets)",
             "true": "Monte-Carlo true Fisher (targets drawn from the model's own predictions)",
             "exact": "exact true Fisher (expectation over every class)"}


def fisher_section(result: Any, figures: Path, label: str, suffix: str = "") -> Section:
    from ..probes.figures import fisher_by_layer, fisher_heads, pruning_curves

    s = result.summary()
    sec = Section("On data: Fisher information" + suffix, [Text(
        f"Diagonal of the {KIND_TEXT.get(s['kind'], s['kind'])} over {s['examples']} examples (one example = one "
        "window; F = Σ_i w_i g_i g_iᵀ with w_i the window's share of the target tokens, so it has the scale of the mean "
        "loss). Per-example gradients by vmap(grad). A head's Fisher is its q rows, o columns and an equal share of its "
        "key/value head; a neuron's is its up/gate rows and down column.")])
    rows = [("Fisher trace", f"{s['trace']:.6g}"), ("parameters", f"{s['parameters']:,}")]
    if "top_eigenvalues" in s:
        rows.append(("top eigenvalues of the empirical Fisher", ", ".join(f"{v:.4g}" for v in s["top_eigenvalues"])))
        if s.get("top_share") is not None:
            rows.append(("share of the trace in them", f"{100 * s['top_share']:.1f}%"))
        rows.append(("how", f"exact: eigenvalues of the {result.spectrum.examples}×{result.spectrum.examples} Gram matrix "
                            "of per-example gradients (rank ≤ examples)"))
    sec.blocks.append(TableBlock(pd.DataFrame(rows, columns=["Fisher", "value"])))
    slug = figures / "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
    if len(result.layers):
        sec.blocks.append(Figure(fisher_by_layer(result.layers, slug, label), "share of the Fisher trace per layer"))
        sec.blocks.append(TableBlock(result.layers, "diagonal Fisher per layer"))
    if len(result.heads):
        sec.blocks.append(Figure(fisher_heads(result.heads, slug, label), "Fisher per attention head (layer × head)"))
    if result.pruning is not None:
        p = result.pruning
        sec.blocks.append(Text(f"Pruning: {p.scope}. Scores: magnitude |w|, Fisher F·w², Taylor |w·g|; exactly the "
                               f"stated share of the {p.prunable:,} prunable weights is zeroed; loss on held-out batches "
                               f"({p.held_out}) not used for the scores."))
        sec.blocks.append(Figure(pruning_curves(p.curves, slug, label), "held-out loss after pruning"))
        wide = p.curves.pivot(index="method", columns="sparsity", values="loss").reset_index()
        wide.columns = [str(c) for c in wide.columns]
        sec.blocks.append(TableBlock(wide, "held-out loss by method and sparsity"))
        if len(p.iou):
            sec.blocks.append(TableBlock(p.iou, "IoU of the pruned sets between methods"))
    for name, parts in result.overlaps.items():
        m = parts["model"].iloc[0]
        sec.blocks.append(Items([f"Fisher overlap {name}: {m['overlap']:.4f} (1 − ½‖√F̂₁ − √F̂₂‖², each F̂ of unit trace; "
                                 f"1 = the same importance pattern), top-1% parameters shared: {m['top_shared']:.3f}"]))
        sec.blocks.append(TableBlock(parts["layers"], f"Fisher overlap per layer ({name})"))
        if "masks" in parts:
            sec.blocks.append(TableBlock(parts["masks"], f"IoU of the Fisher pruning masks of the two datasets ({name})"))
    return sec
