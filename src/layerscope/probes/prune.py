"""Importance scores, pruning masks, and how the loss on held-out batches degrades as weights go.

Scores (one per weight; a weight with a low score is pruned first):

* ``magnitude`` — |w|;
* ``fisher`` — F_ii · w_i², the diagonal-Fisher estimate of the loss increase from zeroing w_i (up to
  the factor ½ of the second-order term, which does not change the order);
* ``taylor`` — |w_i · g_i| with g = ∇L on the calibration batches (the first-order term).

Scope: one global ranking over every *prunable matrix* — the 2-D (or stacked 3-D) weights of the
attention and MLP projections (roles attn.q/k/v/o/qkv, mlp.up/gate/down/gate_up, moe.expert.*).
Embeddings, the LM head, norms, biases and the MoE router are never pruned: they are small or
shared, and zeroing them measures something else. At sparsity s exactly round(s · P) of the P
prunable weights are zeroed (ties broken by position: a stable sort), so every method prunes the
same count.

The curve is the mean token loss on batches *not* used for the Fisher or the gradient (held out),
at sparsity 0 and each requested sparsity, one curve per method. Masks are compared by IoU of
their pruned sets (between methods here; between checkpoints or datasets with :func:`mask_iou`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch

from ..errors import LayerscopeError
from .model import RunnableModel
from .objective import Objective

PRUNABLE_ROLES = ("attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv", "mlp.up", "mlp.gate", "mlp.down", "mlp.gate_up",
                  "moe.expert.up", "moe.expert.gate", "moe.expert.down", "moe.expert.gate_up")
METHODS = ("magnitude", "fisher", "taylor")
SCOPE = ("global over the attention and MLP weight matrices (roles " + ", ".join(PRUNABLE_ROLES[:9]) +
         ", MoE experts); embeddings, LM head, norms and biases are kept")


def parse_sparsities(text: str | Sequence[float]) -> list[float]:
    """``"0.1,0.3,0.5"`` -> [0.1, 0.3, 0.5]; each in (0, 1)."""
    if isinstance(text, str):
        try:
            values = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise LayerscopeError(f"--prune: expected sparsities such as 0.1,0.3,0.5, got {text!r}") from None
    else:
        values = [float(v) for v in text]
    if not values or any(not 0 < v < 1 for v in values):
        raise LayerscopeError(f"--prune: every sparsity must lie strictly between 0 and 1, got {text!r}")
    return sorted(set(values))


def prunable(model: RunnableModel) -> list[str]:
    names = [n for n, p in model.params.items() if p.dim() >= 2 and model.role(n) in PRUNABLE_ROLES]
    if not names:
        raise LayerscopeError(f"{model.label}: no attention or MLP weight matrices to prune")
    return names


def loss_gradient(objective: Objective, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """∇L over every batch of ``objective`` (one batch's graph at a time)."""
    params = [objective.model.params[n] for n in names]
    total = [torch.zeros_like(p) for p in params]
    for b in range(objective.n_batches):
        grads = torch.autograd.grad(objective.batch_term(b), params, allow_unused=True)
        for t, g in zip(total, grads):
            if g is not None:
                t += g
    return {n: t.detach() for n, t in zip(names, total)}


def scores(method: str, model: RunnableModel, names: Sequence[str], *, fisher: Mapping[str, torch.Tensor] | None = None,
           gradient: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for n in names:
        w = model.params[n].detach().to("cpu", torch.float64)
        if method == "magnitude":
            out[n] = w.abs()
        elif method == "fisher":
            out[n] = fisher[n].to(torch.float64) * w * w
        elif method == "taylor":
            out[n] = (w * gradient[n].to("cpu", torch.float64)).abs()
        else:
            raise LayerscopeError(f"unknown pruning method {method!r} (known: {', '.join(METHODS)})")
    return out


def prune_order(score: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """Flat indices (over ``names`` concatenated) from the least to the most important (stable)."""
    flat = torch.cat([score[n].reshape(-1) for n in names])
    return torch.sort(flat, stable=True).indices


def pruned_mask(order: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Flat boolean mask, True where pruned: exactly round(sparsity · P) entries."""
    mask = torch.zeros(order.numel(), dtype=torch.bool)
    mask[order[: int(round(sparsity * order.numel()))]] = True
    return mask


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """|A ∩ B| / |A ∪ B| of two pruned sets (flat boolean masks over the same parameters)."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else math.nan


def split_mask(mask: torch.Tensor, model: RunnableModel, names: Sequence[str]) -> dict[str, torch.Tensor]:
    out, o = {}, 0
    for n in names:
        p = model.params[n]
        out[n] = mask[o:o + p.numel()].view(p.shape)
        o += p.numel()
    return out


class Zeroed:
    """Zero the masked weights of ``model`` inside the ``with`` block, and restore them after."""

    def __init__(self, model: RunnableModel, masks: Mapping[str, torch.Tensor]):
        self.model, self.masks = model, masks
        self.saved: dict[str, torch.Tensor] = {}

    def __enter__(self) -> "Zeroed":
        with torch.no_grad():
            for n, m in self.masks.items():
                p = self.model.params[n]
                self.saved[n] = p.detach().clone()
                p.masked_fill_(m.to(p.device), 0.0)
        return self

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for n, v in self.saved.items():
                self.model.params[n].copy_(v)


@dataclass
class PruningResult:
    """curves: method, sparsity, pruned, loss, perplexity, delta_loss (held-out); iou: sparsity, a, b, iou."""

    curves: pd.DataFrame
    iou: pd.DataFrame
    prunable: int
    held_out: str
    scope: str = SCOPE
    baseline: float = math.nan
    masks: dict[str, dict[float, torch.Tensor]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"scope": self.scope, "prunable": self.prunable, "held_out": self.held_out, "baseline_loss": self.baseline,
                "curves": self.curves.to_dict(orient="records"), "iou": self.iou.to_dict(orient="records")}


def pruning_probe(calibration: Objective, held_out: Objective, fisher: Mapping[str, torch.Tensor], sparsities: Sequence[float],
                  *, methods: Sequence[str] = METHODS, store: Any = None, cache: bool = True, fisher_tag: str = "",
                  progress: Callable[[str, int, int], None] | None = None) -> PruningResult:
    """Masks from each method at each sparsity (scores from ``calibration``), the held-out loss after
    pruning, and the IoU of the methods' masks."""
    from . import probe_key

    model = calibration.model
    names = prunable(model)
    sparsities = parse_sparsities(sparsities)
    gradient = loss_gradient(calibration, names) if "taylor" in methods else None
    key = f"{probe_key(model, calibration.data)}:{held_out.data.hash}"
    total = 1 + len(methods) * len(sparsities)
    done = 0

    def evaluate(tag: dict[str, Any]) -> dict[str, float]:
        nonlocal done
        text = json.dumps({**tag, "fisher": fisher_tag}, sort_keys=True)
        stored = store.artifact(key, "prune.loss", text) if store is not None and cache else None
        if stored is None:
            r = held_out.evaluate()
            stored = {"loss": r.loss, "perplexity": r.perplexity}
            if store is not None:
                store.put_artifact(key, "prune.loss", text, stored)
        done += 1
        if progress:
            progress("pruning: held-out evaluations", done, total)
        return stored

    base = evaluate({"method": "none", "sparsity": 0.0})
    rows = [{"method": m, "sparsity": 0.0, "pruned": 0, **base, "delta_loss": 0.0} for m in methods]
    masks: dict[str, dict[float, torch.Tensor]] = {}
    n_prunable = sum(model.params[n].numel() for n in names)
    for m in methods:
        order = prune_order(scores(m, model, names, fisher=fisher, gradient=gradient), names)
        masks[m] = {}
        for s in sparsities:
            mask = pruned_mask(order, s)
            masks[m][s] = mask
            with Zeroed(model, split_mask(mask, model, names)):
                r = evaluate({"method": m, "sparsity": s})
            rows.append({"method": m, "sparsity": s, "pruned": int(mask.sum()), **r, "delta_loss": r["loss"] - base["loss"]})
    ious = [{"sparsity": s, "a": a, "b": b, "iou": mask_iou(masks[a][s], masks[b][s])}
            for s in sparsities for i, a in enumerate(methods) for b in methods[i + 1:]]
    return PruningResult(pd.DataFrame(rows), pd.DataFrame(ious, columns=["sparsity", "a", "b", "iou"]), n_prunable,
                         held_out.data.description, baseline=base["loss"], masks=masks)
