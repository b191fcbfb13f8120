"""The report's "On text: what the model does" section (``layerscope.activations`` results): head
behaviour heatmaps (placed right after the weight-based head heatmaps), the logit lens by layer, the
CKA heatmap, hidden-state geometry and MLP neurons."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .document import Figure, Gallery, Items, Section, TableBlock, Text


def activations_section(m, figures: Path, suffix: str) -> Section:
    from ..probes.activation_figures import behaviour_heatmaps, cka_heatmap, lens_plot, representation_plot
    from ..probes.activations import HEAD_RULE

    a = m.activations
    d, s = a.data, a.summary
    slug = figures / ("".join(c if c.isalnum() or c in "-_" else "_" for c in m.label) + "_activations")
    sec = Section("On text: what the heads, layers and neurons do" + suffix, [Text(
        f"The model run on {d.description}: {d.n_batches} batches, {s['tokens']:,} tokens (data hash {d.hash[:12]}). "
        f"Head scores follow TransformerLens' detect_head (\"mul\"); induction is measured on random tokens repeated "
        f"twice (half length {s['induction_layout']['half']}). A behaviour is named when its score is ≥ {HEAD_RULE}; "
        "a head is an attention sink when its mean attention to the first position exceeds 0.3. Definitions: README, "
        "\"Activations: what the model does on text\".")])
    paths = behaviour_heatmaps(a.heads, slug, m.label)
    sec.blocks.append(Gallery([Figure(p, p.stem.replace("behaviour_", "").replace("_", " ") + " (layer × head, on text)")
                               for p in paths]))
    h = a.heads
    from ..weights.heads import head_label

    named = lambda col: ", ".join(head_label(int(r.layer), int(r.head)) for r in h[h[col]].itertuples()) or "none"  # noqa: E731
    items = [f"previous-token heads: {named('is_prev_token_head')}", f"induction heads: {named('is_induction_head')}",
             f"duplicate-token heads: {named('is_duplicate_token_head')}",
             f"attention sinks: {named('is_sink')} (sink rate {s.get('sink_rate', float('nan')):.2f} of heads)"]
    if "icl_loss_drop" in s:
        items.append(f"in-context learning on repeated random tokens: loss {s['loss_first_half']:.3f} → "
                     f"{s['loss_second_half']:.3f} nats (drop {s['icl_loss_drop']:.3f})")
    sec.blocks.append(Items(items))
    cols = ["layer", "head", "prev_token", "duplicate_token", "induction_text", "induction", "first_token_share",
            "attention_entropy"] + [c for c in ("qk_entropy_rank", "ov_copying_score") if c in h]
    sec.blocks.append(TableBlock(h[cols], "head behaviour on text, with the weight-based QK/OV metrics", max_rows=64))
    if a.lens is not None:
        sec.blocks.append(Figure(lens_plot(a.lens, slug, m.label, s.get("next_token_entropy")),
                                 "logit lens: each layer read through the final norm and unembedding"))
        sec.blocks.append(TableBlock(a.lens, f"logit lens by layer (H(next token) = {s['next_token_entropy']:.3f} nats; "
                                             "mi_lower_bound = H − loss)"))
    if len(a.cka):
        sec.blocks.append(Figure(cka_heatmap(a.cka, slug, m.label), f"debiased linear CKA between layers "
                                                                    f"({s.get('cka_tokens', 0)} sampled tokens)"))
    sec.blocks.append(Figure(representation_plot(a.representations, slug, m.label), "hidden-state geometry by layer"))
    sec.blocks.append(TableBlock(a.representations, "hidden states by layer (0 = embeddings)"))
    if len(a.neuron_layers):
        sec.blocks.append(TableBlock(a.neuron_layers, "MLP neurons per layer (active: activation > 0)"))
        rows = [{"group": e["group"], "neuron": f"{e['layer']}.{e['neuron']}", "frequency": e["frequency"],
                 "top tokens (in context)": " | ".join(f"…{x['context'][-24:]}[{x['token']}]" for x in e["examples"][:3])}
                for e in a.neuron_examples]
        if rows:
            sec.blocks.append(TableBlock(pd.DataFrame(rows), "neurons and the tokens that activate them most", max_rows=30))
    if a.notes:
        sec.blocks.append(Items(a.notes))
    return sec
