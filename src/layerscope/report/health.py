"""Report sections for the model's surroundings and gradients: loss landscapes (plots, barrier,
roughness, sharpness) and gradient health (per-layer table, noise scale, flags, MLP neurons).

Landscapes reach the report through the store: every ``layerscope landscape`` run files its summary
and points under the first checkpoint's weights hash, so the report of that checkpoint shows every
landscape computed around or from it. Gradient health comes with the probe result
(``layerscope run``, or ``probe(..., gradients=True)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from .document import Figure, Gallery, Section, TableBlock, Text


def stored_landscapes(source: Any, config: Any) -> list:
    """Landscapes stored for this checkpoint (as the first model), newest layout first."""
    from ..probes.landscape import stored_landscapes as read
    from ..probes.model import weights_hash
    from ..store import Store

    with Store(config.resolved_store()) as store:
        return read(weights_hash(source, store), store)


def sections(m: Any, figures: Path, suffix: str) -> list[Section]:
    """The landscape and gradient-health sections of one model (none when neither was run)."""
    out = [landscape_section(m, figures, suffix)] if getattr(m, "landscapes", None) else []
    probe = getattr(m, "probe", None)
    if probe is not None and getattr(probe, "gradients", None) is not None:
        out.append(gradient_section(probe.gradients, suffix))
    return out


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def landscape_section(m: Any, figures: Path, suffix: str) -> Section:
    sec = Section("Loss landscapes" + suffix, [Text(
        "The probe loss (mean token cross-entropy on fixed batches) along a line between two checkpoints, or on a "
        "plane: around the checkpoint along filter-normalised random directions (Li et al. 2018) or the top-2 "
        "Hessian eigenvectors, or through three checkpoints.")])
    for i, res in enumerate(m.landscapes):
        folder = figures / _slug(m.label) / f"landscape_{i}"
        s = res.summary
        if res.kind == "interpolation":
            rows = [("models", " → ".join(res.labels)), ("L(0), L(1)", f"{s['loss_start']:.4f}, {s['loss_end']:.4f}"),
                    ("barrier", f"{s['barrier']:.4g} ± {s['barrier_se']:.2g} at α = {s['barrier_alpha']:.3g}"),
                    ("threshold", f"{s['barrier_threshold']:.4g}"),
                    ("verdict", "a barrier" if s["has_barrier"] else "no barrier: linearly connected on this data")]
            sec.blocks.append(TableBlock(pd.DataFrame(rows, columns=["1-D interpolation", "value"])))
            sec.blocks.append(Figure(res.plot(folder)[0], "loss along the straight line between the checkpoints"))
            sec.blocks.append(Text("Rule: " + s["rule"] + "."))
            continue
        rows = [("directions", s.get("directions", res.kind)), ("grid", f"{s.get('grid')} × {s.get('grid')}"),
                ("loss range", f"{s['min_loss']:.4f} – {s['max_loss']:.4f}"), ("roughness", f"{s['roughness']:.3g}"),
                ("total variation", f"{s['total_variation']:.4g}")]
        for key, label in (("loss_centre", "loss at the centre"), ("curvature_x", "curvature along direction 1"),
                           ("curvature_y", "curvature along direction 2"), ("eps_sharpness", "ε-sharpness (%)")):
            if key in s:
                rows.append((label, f"{s[key]:.4g}"))
        if "hessian_eigenvalues" in s:
            rows.append(("Hessian top-2 eigenvalues", ", ".join(f"{v:.5g}" for v in s["hessian_eigenvalues"])))
        sec.blocks.append(TableBlock(pd.DataFrame(rows, columns=[f"2-D ({res.kind})", "value"])))
        paths = res.plot(folder)
        sec.blocks.append(Gallery([Figure(paths[0], "contours"), Figure(paths[1], "surface")]))
        sec.blocks.append(Text("Roughness: " + s.get("roughness_rule", "") + ". "
                               + ("Sharpness: " + s["sharpness_rule"] + "." if "sharpness_rule" in s else "")))
    return sec


def gradient_section(g: Any, suffix: str) -> Section:
    cols = ["group", "grad_norm", "share", "grad_to_weight", "gsnr", "B_simple", "B_simple_se", "B_simple_two_batch",
            "B_simple_two_batch_se", "flag"]
    groups = g.groups[[c for c in cols if c in g.groups.columns]]
    n = g.noise
    rows = []
    if n.get("per_example"):
        pe = n["per_example"]
        rows.append(("per-example (exact)", pe["B_simple"], pe["se"], pe["G2"], pe["trace_sigma"]))
    tb = n["two_batch"]
    rows.append((f"two batch sizes ({n['batch_size']} and {n['examples']})", tb["B_simple"], tb["se"], tb["G2"],
                 tb["trace_sigma"]))
    noise = pd.DataFrame(rows, columns=["estimator", "B_simple", "jackknife s.e.", "|G|²", "tr(Σ)"])
    flagged = groups[groups["flag"] != ""] if "flag" in groups else groups.iloc[0:0]
    sec = Section("Gradient health on data" + suffix, [
        Text(f"Gradients of the probe loss on {g.data_description}. share = the group's part of ‖∇L‖²; "
             "grad_to_weight = ‖∇L‖/‖θ‖; GSNR = mean over entries of mean²/variance over examples; B_simple = "
             "tr(Σ)/|G|² (McCandlish et al. 2018) in examples."),
        TableBlock(groups, "per layer (and outside layers), then the whole model", max_rows=80),
        TableBlock(noise, "gradient noise scale of the whole model"),
        Text(g.rules.get("noise", "")),
        Text("Flags: " + (", ".join(f"{a} {b}" for a, b in zip(flagged["group"], flagged["flag"])) or
                          "none — no layer's gradient-to-weight ratio is a decade off its peers")
             + ". Rule: " + g.rules.get("flags", "") + "."),
    ])
    if g.neurons is not None and len(g.neurons):
        cols = ["layer", "neurons", "tokens", "dead", "always_on", "mean_active_fraction"]
        sec.blocks.append(TableBlock(g.neurons[cols], "MLP neurons on the probe data"))
        sec.blocks.append(Text("Rule: " + g.rules.get("neurons", "") + "."))
    return sec
