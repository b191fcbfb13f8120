"""MLP neurons on text: how often each fires, which are dead, and which tokens drive them.

A neuron's activation is the input of its layer's down-projection (the anatomy's ``mlp.down``), read
by a forward pre-hook: act(W_up x) for GELU/ReLU MLPs, act(W_gate x) · W_up x for gated ones. A neuron
is *active* on a token when its activation exceeds ``threshold`` (default 0: for GELU, ReLU and SiLU
that is a positive pre-activation, the unit firing; for gated MLPs it counts positive outputs).
``frequency`` is the share of the data's tokens on which it is active; a neuron is *dead* when it is
never active and *always on* when its frequency is at least 0.99; a layer's ``sparsity`` is one minus
its neurons' mean frequency.

For every neuron the ``top_k`` largest activations and their token positions are kept, exactly: each
batch gives a small candidate set per neuron (``block_candidates``), and the candidates are merged by
one top-k whenever they reach ``MERGE_ELEMENTS`` and at the end, so memory is O(neurons × top_k) plus
that bound; at the end the most and least
frequently active live neurons — and the highest-scoring ones under ``neuron_scores`` (the hook for
the Fisher probe's per-neuron Fisher) — are shown with those tokens in context, decoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ALWAYS_ON = 0.99
BLOCK = 8  # tokens per block in ``top_rows``


def topk_rows(x: torch.Tensor, k: int, values: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``x.topk(k, dim=-2)`` of a float32 (…, n, f) tensor for a small k, by k rounds of a max over
    rows. The CPU's top-k (and any max that returns indices) works column by column, about 0.5 µs
    each; a plain max is one vectorised pass. So each value and its row are packed into one int64
    whose order is the value's order (the float32 bits, negatives flipped, above the row number),
    and each round takes the max and knocks it out. Exact; ties go to the later row."""
    n = x.shape[-2]
    if k > 8 or n >= 1 << 31:
        return x.topk(k, dim=-2)
    key = x.float().contiguous().view(torch.int32).to(torch.int64)
    key ^= (key >> 31) & 0x7FFFFFFF  # negatives: flip the magnitude bits, so integer order = float order
    key <<= 32
    key |= torch.arange(n, device=x.device, dtype=torch.int64)[:, None]
    best = []
    for _ in range(k):
        m = key.amax(dim=-2, keepdim=True)
        best.append(m)
        key.scatter_(-2, m & 0xFFFFFFFF, torch.iinfo(torch.int64).min)
    m = torch.cat(best, dim=-2)
    if not values:
        return None, m & 0xFFFFFFFF
    hi = m >> 32
    vals = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).to(torch.int32).view(torch.float32)
    return vals, m & 0xFFFFFFFF


def block_candidates(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates that hold every column's k largest values, for (…, tokens, neurons) activations:
    (values, rows), each (…, c, neurons) with c ≤ k · ``BLOCK`` + ``BLOCK``. The k largest values of a
    column lie in at most k blocks of ``BLOCK`` consecutive tokens, and those blocks are among the k
    with the largest block maxima; so one contiguous max over blocks and a top-k over the
    tokens / ``BLOCK`` block maxima replace a top-k over every token."""
    a = a.float()
    n, f = a.shape[-2:]
    nb = n // BLOCK
    if nb <= k:  # every token is a candidate (a copy: the caller may overwrite ``a``, or it is the model's)
        rows = torch.arange(n, device=a.device)[:, None].expand(*a.shape)
        return a.clone(), rows
    lead = a.shape[:-2]
    maxima = a[..., : nb * BLOCK, :].reshape(*lead, nb, BLOCK, f).amax(-2)
    best = topk_rows(maxima, k, values=False)[1]  # (…, k, f) block numbers
    offsets = torch.arange(BLOCK, device=a.device)[:, None]
    rows = (best[..., :, None, :] * BLOCK + offsets).reshape(*lead, k * BLOCK, f)
    if nb * BLOCK < n:  # the last partial block is always a candidate
        tail = torch.arange(nb * BLOCK, n, device=a.device)[:, None].expand(*lead, n - nb * BLOCK, f)
        rows = torch.cat([rows, tail], dim=-2)
    return a.gather(-2, rows), rows


def top_rows(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``a.float().topk(k, dim=-2)`` (values, rows) of (…, tokens, neurons), exactly (with ties,
    another of the equal values may be the one picked)."""
    vals, rows = block_candidates(a, k)
    vals, pick = topk_rows(vals, min(k, vals.shape[-2]))
    return vals, rows.gather(-2, pick)


def active_counts(a: torch.Tensor, threshold: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per neuron, how many tokens have activation > threshold: (…, tokens, neurons) -> (…, neurons)
    float32. Summed as float32 signs (exact below 2²⁴ tokens per batch; a third of the time of a bool
    sum on the CPU); a column holding a NaN is recounted with the comparison, where NaN is not active.
    ``out``: a work buffer shaped like ``a``, reused from batch to batch (``a`` itself when it may be
    overwritten)."""
    x = a if threshold == 0 else a - threshold
    signs = torch.sign(x, out=out) if out is not None and out.shape == x.shape else x.sign()
    c = signs.clamp_(min=0).sum(-2, dtype=torch.float32)
    if bool(c.isnan().any()):  # NaN stays NaN through sign and clamp; every other entry is 1 (active) or 0
        c = (signs > 0).sum(-2, dtype=torch.float32)
    return c


STACK_ELEMENTS = 1 << 22  # activations (all layers) up to which the layers are stacked into one tensor
MERGE_ELEMENTS = 1 << 21  # pending top-k candidates (values) per group before they are merged


@dataclass
class _Group:
    """Layers of one MLP width, stacked: counts and top-k candidates for all of them at once."""

    layers: list[int]
    count: torch.Tensor  # (L, F) float64
    pending: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (values, flat token index)
    stack: torch.Tensor | None = None  # work buffers, one batch in size
    signs: torch.Tensor | None = None


@dataclass
class NeuronAccumulator:
    threshold: float = 0.0
    top_k: int = 5
    tokens: int = 0
    active: dict[int, torch.Tensor] = field(default_factory=dict)  # filled by ``finish``
    top_values: dict[int, torch.Tensor] = field(default_factory=dict)
    top_index: dict[int, torch.Tensor] = field(default_factory=dict)
    groups: dict[tuple, _Group] = field(default_factory=dict)  # (width, layers) -> group

    def add(self, layer: int, acts: torch.Tensor, offset: int) -> None:
        """acts: (B, S, d_ff) of one batch whose first token has flat index ``offset`` in the data."""
        self.add_layers({layer: acts}, offset)

    def add_layers(self, acts: dict[int, torch.Tensor], offset: int) -> None:
        """layer -> (B, S, d_ff) activations of one batch whose first token has flat index ``offset``.

        Layers of equal width are stacked, so a batch costs a few batched operations however deep
        the model: the activation counts, and each neuron's top-k candidates (``block_candidates``),
        which wait in a list and are merged by one top-k when they reach ``MERGE_ELEMENTS`` and at
        ``finish`` (memory stays O(neurons × top_k) plus that bound)."""
        if not acts:
            return
        by_width: dict[int, list[int]] = {}
        if sum(a.numel() for a in acts.values()) <= STACK_ELEMENTS:
            for layer, a in acts.items():
                by_width.setdefault(a.shape[-1], []).append(layer)
        else:  # large: layer by layer, with no stacking copy
            by_width = {i: [layer] for i, layer in enumerate(acts)}
        for layers in by_width.values():
            width = acts[layers[0]].shape[-1]
            parts = [acts[layer].reshape(-1, width) for layer in layers]
            g = self.groups.get((width, tuple(layers)))
            if g is None:
                g = self.groups[(width, tuple(layers))] = _Group(
                    layers, torch.zeros(len(layers), width, dtype=torch.float64, device=parts[0].device))
            shape = (len(layers), *parts[0].shape)
            if len(parts) == 1:  # the model's own tensor: counted through a work buffer
                a = parts[0][None]
                if g.signs is None or g.signs.shape != shape:
                    g.signs = torch.empty(shape, dtype=torch.float32, device=a.device)
                vals, rows = block_candidates(a, self.top_k)
                g.count += active_counts(a if a.dtype == torch.float32 else a.float(), self.threshold, out=g.signs)
            else:  # stacked into our buffer, which the count then overwrites (top-k candidates first)
                if g.stack is None or g.stack.shape != shape or g.stack.dtype != parts[0].dtype:
                    g.stack = torch.empty(shape, dtype=parts[0].dtype, device=parts[0].device)
                a = torch.stack(parts, out=g.stack)  # (L, N, F)
                vals, rows = block_candidates(a, self.top_k)
                g.count += active_counts(a, self.threshold, out=a if a.dtype == torch.float32 else None)
            g.pending.append((vals, rows + offset))
            if sum(v.numel() for v, _ in g.pending) > MERGE_ELEMENTS:
                self._merge(g)

    def _merge(self, g: _Group) -> None:
        if len(g.pending) == 1 and g.pending[0][0].shape[-2] <= self.top_k:
            return
        vals = torch.cat([v for v, _ in g.pending], dim=-2)
        index = torch.cat([i for _, i in g.pending], dim=-2)
        vals, pick = topk_rows(vals, min(self.top_k, vals.shape[-2]))
        g.pending = [(vals, index.gather(-2, pick))]

    def finish(self) -> None:
        """Merge what is pending and publish per-layer tensors on the CPU: ``active`` (counts),
        ``top_values`` and ``top_index`` (top_k × d_ff each). Safe to call again after more batches."""
        for g in self.groups.values():
            if not g.pending:
                continue
            self._merge(g)
            vals, index = g.pending[0]
            count, vals, index = g.count.round().to(torch.int64).cpu(), vals.cpu(), index.cpu()
            for k, layer in enumerate(g.layers):
                self.active[layer], self.top_values[layer], self.top_index[layer] = count[k], vals[k], index[k]

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
