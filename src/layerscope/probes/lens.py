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

    def add_batch(self, lens: LensHead, states: list[torch.Tensor], final_logits: torch.Tensor,
                  labels: torch.Tensor) -> None:
        """states: one (B, S, d) per layer (0 = embeddings, last = the last block's output)."""
        mask = (labels != -100).flatten()
        if not bool(mask.any()):
            return
        target = labels.flatten()[mask]
        flat = [s.reshape(-1, s.shape[-1])[mask] for s in states]
        final = final_logits.reshape(-1, final_logits.shape[-1])[mask]
        vocab = final.shape[-1]
        if self.counts is None:
            self.counts = torch.zeros(vocab, dtype=torch.float64)
        self.counts += torch.bincount(target.cpu(), minlength=vocab).to(torch.float64)[:vocab]
        names = ("loss", "top1_agreement", "kl_to_final", "entropy", "top1_accuracy")
        for k in names:
            self.sums.setdefault(k, torch.zeros(len(states), dtype=torch.float64))
        with torch.no_grad():
            for sl in chunks(len(target), vocab):
                f_logp = torch.log_softmax(final[sl].float(), dim=-1)
                f_top = f_logp.argmax(-1)
                t = target[sl]
                for layer, x in enumerate(flat):
                    logits = final[sl] if layer == len(flat) - 1 else lens(x[sl])
                    logp = torch.log_softmax(logits.float(), dim=-1)
                    p = logp.exp()
                    top = logp.argmax(-1)
                    add = {"loss": -logp.gather(-1, t[:, None]).sum(),
                           "top1_agreement": (top == f_top).sum(),
                           "kl_to_final": (f_logp.exp() * (f_logp - logp)).sum(),
                           "entropy": -(p * logp).sum(),
                           "top1_accuracy": (top == t).sum()}
                    for k, v in add.items():
                        self.sums[k][layer] += float(v)
        self.positions += len(target)

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
