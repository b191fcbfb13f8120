"""Logit lens: every layer's residual stream read through the model's own final norm and unembedding.

The final norm is re-applied to each layer's state with its own statistics (TransformerLens #1076
applied the last layer's scale to every layer, which made early layers look uniform). The norm and
head are the model's modules, found through the anatomy (the ``norm`` with no layer that comes after
the blocks, and ``get_output_embeddings``), and the lens is only reported when it reproduces the
model's own logits at the last layer (checked on the first batch), so a model with an extra step
between norm and head (soft-capping, scaled logits) gets a note instead of wrong numbers.

Per layer, over the positions with a next-token target: cross-entropy ``loss``; ``top1_agreement``
with the final layer's argmax; ``kl_to_final`` = KL(p_final ‖ p_layer); ``entropy`` of p_layer; and
``mi_lower_bound`` = H(next token) − loss, a lower bound on I(state; next token) (the cross-entropy
of any predictor bounds H(next | state) from above), with H the plug-in entropy of the data's
empirical unigram distribution of target tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .workspace import Workspace

CHUNK_ELEMENTS = 1 << 23  # positions × vocabulary per logits chunk (32 MiB in float32)


@dataclass
class LensHead:
    """``norm`` then ``head``: what turns a residual-stream state into logits."""

    norm: torch.nn.Module | None
    head: torch.nn.Module

    def __call__(self, state: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(state) if self.norm is not None else state)


def find_lens(model, blocks_name: str | None) -> tuple[LensHead | None, str]:
    """The final norm and LM head of a causal LM, or None and the reason."""
    if model.kind != "causal":
        why = model.no_lm_head_reason or f"the logit lens reads next-token predictions; this is a {model.kind} model"
        return None, f"logit lens: skipped: {why}"
    module = model.module
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    if head is None:
        return None, "logit lens: skipped: the model exposes no output embedding (LM head)"
    names = [n for n, _ in module.named_modules()]
    order = {n: i for i, n in enumerate(names)}
    after = order.get(blocks_name, -1) if blocks_name else -1
    finals = []
    for name, e in model.anatomy.entries.items():
        if e.layer is None and e.role.startswith("norm") and not e.role.startswith("norm.embed"):
            mod = name.rsplit(".", 1)[0]
            if order.get(mod, -1) > after and "embed" not in mod:
                finals.append(mod)
    norm = dict(module.named_modules())[finals[-1]] if finals else None
    return LensHead(norm, head), ""


NAMES = ("loss", "top1_agreement", "kl_to_final", "entropy", "top1_accuracy")


def layer_stats(logits: torch.Tensor, target: torch.Tensor, ws: Workspace | None = None, owned: bool = False) -> torch.Tensor:
    """(len(NAMES), layers) float64 sums over positions, from (c, layers, V) logits (position-major)
    whose last layer is the model's final prediction, and the (c,) next tokens: loss; agreement with
    the final top-1 ("the final top-1 token has this layer's largest log-probability": the same as
    comparing argmaxes but for exact ties, and one max instead of an argmax per layer);
    KL(final ‖ layer) = Σ p_f log p_f − Σ p_f log p_layer, exactly 0 at the last layer (the same two
    numbers); entropy; accuracy. The two sums over the vocabulary are batched matmuls. ``owned``: the
    logits are a work buffer, free to be overwritten (by the probabilities)."""
    c, layers, vocab = logits.shape
    ws = ws or Workspace()
    logp = torch.log_softmax(logits, dim=-1, out=ws("logp", logits.shape, logits.dtype, logits.device))
    p = torch.exp(logp, out=logits if logits.is_contiguous() and owned else ws("p", logits.shape, logits.dtype,
                                                                               logits.device))
    top = logp.amax(-1)  # (c, layers)
    f_logp, f_p = logp[:, -1], p[:, -1]
    f_top = f_logp.argmax(-1)
    at_target = logp.gather(-1, target.view(c, 1, 1).expand(c, layers, 1)).squeeze(-1)
    at_final_top = logp.gather(-1, f_top.view(c, 1, 1).expand(c, layers, 1)).squeeze(-1)
    neg_entropy = torch.bmm(p.view(-1, 1, vocab), logp.view(-1, vocab, 1)).view(c, layers)
    cross = torch.bmm(logp, f_p.unsqueeze(-1)).squeeze(-1)  # (c, layers): Σ p_f log p_layer
    per_position = torch.stack([-at_target, (at_final_top >= top).to(logp.dtype), cross[:, -1:] - cross, -neg_entropy,
                                (at_target >= top).to(logp.dtype)])
    return per_position.sum(1, dtype=torch.float64)


def chunks(n: int, vocab: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


@dataclass
class LensAccumulator:
    """Per-layer sums over target positions, and unigram counts of the targets."""

    n_layers: int
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    positions: int = 0
    counts: torch.Tensor | None = None
    ws: Workspace = field(default_factory=Workspace, repr=False)

    def add_batch(self, lens: LensHead, states: list[torch.Tensor], final_logits: torch.Tensor,
                  labels: torch.Tensor) -> None:
        """states: one (B, S, d) per layer (0 = embeddings, last = the last block's output).

        Every layer but the last goes through the lens at once (the norm works row by row, so the
        layers are stacked into one (layers × positions, d) batch for the norm and the unembedding);
        the last layer is the model's own logits, stacked after them, so every statistic is one
        batched operation over (layers, positions, vocabulary). Chunks keep that block under
        ``CHUNK_ELEMENTS``. Per-position values are float32; their sums over positions float64."""
        mask = (labels != -100).flatten()
        every = bool(mask.all())  # then no boolean indexing (a gather per state)
        if not every and not bool(mask.any()):
            return
        target = labels.flatten() if every else labels.flatten()[mask]
        n = len(target)
        final = final_logits.reshape(-1, final_logits.shape[-1])
        final = final if every else final[mask]
        vocab = final.shape[-1]
        if self.counts is None:
            self.counts = torch.zeros(vocab, dtype=torch.float64)
        self.counts += torch.bincount(target.cpu(), minlength=vocab).to(torch.float64)[:vocab]
        n_layers = len(states)
        for k in NAMES:
            self.sums.setdefault(k, torch.zeros(n_layers, dtype=torch.float64))
        flat = [s.reshape(-1, s.shape[-1]) for s in states[:-1]]
        x = torch.stack(flat if every else [f[mask] for f in flat], dim=1) if n_layers > 1 else None  # (n, L − 1, d)
        sums = torch.zeros(len(NAMES), n_layers, dtype=torch.float64, device=final.device)
        with torch.no_grad():
            for sl in chunks(n, vocab * n_layers):
                c = sl.stop - sl.start
                if x is not None:
                    xs = x[sl]  # (c, L − 1, d), position-major: the lens' rows come out in (position, layer) order
                    parts = [lens(xs.reshape(-1, xs.shape[-1])).float().view(c, n_layers - 1, vocab), final[sl, None].float()]
                    logits = torch.cat(parts, dim=1, out=self.ws("logits", (c, n_layers, vocab), parts[0].dtype,
                                                                   parts[0].device))
                else:
                    logits = final[sl, None].float()
                sums += layer_stats(logits, target[sl], self.ws, owned=x is not None)
        for k, name in enumerate(NAMES):
            self.sums[name] += sums[k].cpu()
        self.positions += n

    def rows(self) -> tuple[list[dict], float]:
        """Per-layer rows, and H(next token) in nats."""
        p = self.counts / self.counts.sum()
        h = float(-(p[p > 0] * p[p > 0].log()).sum())
        rows = []
        for layer in range(len(self.sums["loss"])):
            r = {"layer": layer, **{k: float(v[layer]) / self.positions for k, v in self.sums.items()}}
            r["mi_lower_bound"] = h - r["loss"]
            r["perplexity"] = math.exp(min(r["loss"], 700.0))
            rows.append(r)
        return rows, h
