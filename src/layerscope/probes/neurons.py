"""MLP neurons on text: how often each fires, which are dead, and which tokens drive them.

A neuron's activation is the input of its layer's down-projection (the anatomy's ``mlp.down``), read
by a forward pre-hook: act(W_up x) for GELU/ReLU MLPs, act(W_gate x) · W_up x for gated ones. A neuron
is *active* on a token when its activation exceeds ``threshold`` (default 0: for GELU, ReLU and SiLU
that is a positive pre-activation, the unit firing; for gated MLPs it counts positive outputs).
``frequency`` is the share of the data's tokens on which it is active; a neuron is *dead* when it is
never active and *always on* when its frequency is at least 0.99; a layer's ``sparsity`` is one minus
its neurons' mean frequency.

For every neuron the ``top_k`` largest activations and their token positions are kept (a running
top-k merged batch by batch, so memory is O(neurons × top_k)); at the end the most and least
frequently active live neurons — and the highest-scoring ones under ``neuron_scores`` (the hook for
the Fisher probe's per-neuron Fisher) — are shown with those tokens in context, decoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ALWAYS_ON = 0.99


@dataclass
class NeuronAccumulator:
    threshold: float = 0.0
    top_k: int = 5
    tokens: int = 0
    active: dict[int, torch.Tensor] = field(default_factory=dict)
    top_values: dict[int, torch.Tensor] = field(default_factory=dict)
    top_index: dict[int, torch.Tensor] = field(default_factory=dict)

    def add(self, layer: int, acts: torch.Tensor, offset: int) -> None:
        """acts: (B, S, d_ff) of one batch whose first token has flat index ``offset`` in the data."""
        a = acts.reshape(-1, acts.shape[-1])
        count = (a > self.threshold).sum(0).to(torch.int64).cpu()
        k = min(self.top_k, a.shape[0])
        vals, idx = a.float().topk(k, dim=0)
        vals, idx = vals.cpu(), idx.cpu() + offset
        if layer in self.active:
            self.active[layer] += count
            v = torch.cat([self.top_values[layer], vals])
            i = torch.cat([self.top_index[layer], idx])
            best = v.topk(min(self.top_k, v.shape[0]), dim=0).indices
            self.top_values[layer], self.top_index[layer] = v.gather(0, best), i.gather(0, best)
        else:
            self.active[layer], self.top_values[layer], self.top_index[layer] = count, vals, idx

    def frequency(self, layer: int) -> torch.Tensor:
        return self.active[layer].to(torch.float64) / max(self.tokens, 1)

    def layer_rows(self) -> list[dict]:
        rows = []
        for layer in sorted(self.active):
            f = self.frequency(layer)
            rows.append({"layer": layer, "neurons": len(f), "dead": int((f == 0).sum()),
                         "always_on": int((f >= ALWAYS_ON).sum()), "mean_frequency": float(f.mean()),
                         "sparsity": 1.0 - float(f.mean())})
        return rows

    def pick(self, per_group: int = 8, scores: dict[int, torch.Tensor] | None = None) -> list[tuple[str, int, int]]:
        """(group, layer, neuron) for the most and least frequently active live neurons, and the
        highest-scoring under ``scores`` (layer -> per-neuron score)."""
        flat = [(float(f), layer, n) for layer in sorted(self.active)
                for n, f in enumerate(self.frequency(layer).tolist())]
        live = [t for t in flat if t[0] > 0]
        out = [("most active", l, n) for _, l, n in sorted(live, key=lambda t: -t[0])[:per_group]]
        out += [("least active", l, n) for _, l, n in sorted(live, key=lambda t: t[0])[:per_group]]
        if scores:
            ranked = sorted(((float(s), l, n) for l, v in scores.items() for n, s in enumerate(v.tolist())),
                            key=lambda t: -t[0])
            out += [("highest score", l, n) for _, l, n in ranked[:per_group]]
        return out

    def dead(self) -> list[tuple[int, int]]:
        return [(layer, int(n)) for layer in sorted(self.active) for n in (self.active[layer] == 0).nonzero().flatten()]


def token_contexts(acc: NeuronAccumulator, picked: list[tuple[str, int, int]], input_ids: torch.Tensor,
                   decode, context: int = 8) -> list[dict]:
    """One row per picked neuron: its top activations with the text leading up to each token."""
    flat = input_ids.reshape(-1)
    seq = input_ids.shape[-1]
    rows = []
    for group, layer, n in picked:
        examples = []
        for v, i in zip(acc.top_values[layer][:, n].tolist(), acc.top_index[layer][:, n].tolist()):
            start = i - min(i % seq, context)  # stay inside the window the token was seen in
            examples.append({"activation": v, "token": decode([int(flat[i])]),
                             "context": decode([int(t) for t in flat[start:i]]), "position": int(i)})
        rows.append({"group": group, "layer": layer, "neuron": n,
                     "frequency": float(acc.frequency(layer)[n]), "examples": examples})
    return rows
