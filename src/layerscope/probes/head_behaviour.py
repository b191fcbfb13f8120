"""What each attention head does on text, reduced from its attention probabilities one batch at a time.

Definitions (``A[b, h, i, j]``: the attention of query position i to key position j in sequence b,
head h; rows sum to 1):

* ``prev_token``, ``duplicate_token``, ``induction_text``: TransformerLens' ``detect_head`` with
  ``error_measure="mul"`` and its defaults (``exclude_bos=False``, ``exclude_current_token=False``):
  per sequence ``Σ_ij A_ij P_ij / Σ_ij A_ij`` with the detection pattern P, averaged over sequences.
  P is (TransformerLens' ``head_detector.py``): previous token ``P_ij = [j = i − 1]``; duplicate token
  ``P_ij = [j < i and t_j = t_i]``; induction ``P_ij = [1 ≤ j ≤ i and t_{j−1} = t_i and j − 1 ≠ i]``
  (attention to the token after an earlier copy of the current token).
* ``induction``: on random tokens repeated twice (TransformerLens' induction demo): the mean, over
  sequences and over every query in the second copy, of the attention to the token just after that
  token's first occurrence (key = query − n + 1, n the half length). TransformerLens' demo takes the
  whole diagonal, which adds two first-half queries (to BOS and to the first token); ours is only the
  second half, so a perfect induction head scores 1.
* ``first_token_share``: mean over query positions i ≥ 1 of ``A_i0`` (position 0 is excluded because a
  causal head's query 0 can only look at itself). ``sink_position_rate``: the share of those queries
  with ``A_i0 > ε`` (ε = 0.3). A head is an *attention sink* when ``first_token_share > ε`` (Gu et al.
  2024's rule, whose model-level sink rate is the share of such heads).
* ``attention_entropy``: mean over query positions i ≥ 1 of ``−Σ_j A_ij ln A_ij`` (nats).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .workspace import Workspace

SINK_EPS = 0.3
SCORES = ("prev_token", "duplicate_token", "induction_text", "first_token_share", "sink_position_rate",
          "attention_entropy")


def detection_patterns(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """TransformerLens' duplicate-token and induction detection patterns for a batch ``ids`` (B, S), as
    bool (B, S, S); the previous-token pattern is the first sub-diagonal (handled without a mask)."""
    s = ids.shape[-1]
    eq = ids[:, :, None] == ids[:, None, :]
    dup = eq & torch.ones(s, s, dtype=torch.bool, device=ids.device).tril(-1)
    ind = torch.zeros_like(dup)
    ind[:, :, 1:] = dup[:, :, :-1]  # key j is right after an earlier copy (j − 1 < i) of token i
    return {"duplicate_token": dup, "induction_text": ind}


def score_masks(ids: torch.Tensor, patterns: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """(B, S·S, 5) float32 masks whose products with a flattened attention matrix give, in one batched
    matmul, every linear score's numerator: total attention, previous token, duplicate token, induction
    (text) and attention to position 0 from queries i ≥ 1. Built once per batch, shared by every layer."""
    b, s = ids.shape
    patterns = patterns if patterns is not None else detection_patterns(ids)
    m = torch.zeros(b, s, s, 5, dtype=torch.float32, device=ids.device)
    m[..., 0] = 1.0
    m[..., 1] = torch.ones(s, s, device=ids.device).tril(-1).triu(-1)  # j = i − 1
    m[..., 2] = patterns["duplicate_token"]
    m[..., 3] = patterns["induction_text"]
    m[:, 1:, 0, 4] = 1.0
    return m.reshape(b, s * s, 5)


def score_matrix(att: torch.Tensor, masks: torch.Tensor, eps: float = SINK_EPS, ws: Workspace | None = None) -> torch.Tensor:
    """Every per-sequence score, stacked: ``att`` (B, H, S, S) -> (B, H, len(SCORES)) float64, in
    ``SCORES`` order; H may be several layers' heads side by side (``layer_scores``). Two passes over
    the attention: one batched matmul against ``masks`` (every linear score: float32 sums of at most
    S² terms, relative error ~1e-7) and the entropy's log."""
    b, h, s, _ = att.shape
    a = att if att.dtype == torch.float32 else att.to(torch.float32)
    lin = torch.bmm(a.reshape(b, h, s * s), masks).to(torch.float64)  # (B, H, 5)
    total = lin[..., 0]
    rest = a[:, :, 1:]
    # −Σ a ln a over the queries i ≥ 1; a = 0 (masked keys) contributes 0 through the clamp
    work = torch.clamp_min(rest, 1e-30, out=(ws or Workspace())("entropy", rest.shape, rest.dtype, rest.device))
    ent = -work.log_().mul_(rest).sum(dim=(-1, -2)).to(torch.float64) / max(s - 1, 1)
    sink = (rest[..., 0] > eps).sum(-1).to(torch.float64) / max(s - 1, 1)
    return torch.stack([lin[..., 1] / total, lin[..., 2] / total, lin[..., 3] / total,
                        lin[..., 4] / max(s - 1, 1), sink, ent], dim=-1)


STACK_ELEMENTS = 1 << 22  # attention entries up to which every layer is scored in one stacked call


def layer_scores(attentions: tuple[torch.Tensor, ...], masks: torch.Tensor, eps: float = SINK_EPS,
                 ws: Workspace | None = None) -> list[torch.Tensor]:
    """``score_matrix`` for every layer: one (B, H, len(SCORES)) per layer. Small attention tensors
    are stacked (one call for all layers: per-operation overhead dominates there); large ones are
    scored layer by layer (the stacking copy would cost more than it saves)."""
    shapes = {tuple(a.shape) for a in attentions}
    if len(shapes) == 1 and sum(a.numel() for a in attentions) <= STACK_ELEMENTS:
        h = attentions[0].shape[1]
        ws = ws or Workspace()
        b, _, s, _ = attentions[0].shape
        stacked = torch.cat(attentions, dim=1, out=ws("stacked", (b, h * len(attentions), s, s), attentions[0].dtype,
                                                      attentions[0].device))
        m = score_matrix(stacked, masks, eps, ws)  # (B, L·H, k)
        return list(m.split(h, dim=1))
    return [score_matrix(a, masks, eps, ws) for a in attentions]


def sequence_scores(att: torch.Tensor, ids: torch.Tensor, patterns: dict[str, torch.Tensor] | None = None,
                    eps: float = SINK_EPS) -> dict[str, torch.Tensor]:
    """Every per-sequence score of one layer: ``att`` (B, H, S, S) -> {name: (B, H)} (float64)."""
    m = score_matrix(att, score_masks(ids, patterns), eps)
    return {name: m[..., k] for k, name in enumerate(SCORES)}


@dataclass
class HeadAccumulator:
    """Running sums of per-sequence scores, per layer: memory O(layers × heads)."""

    sums: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (H, len(SCORES)) float64
    sequences: int = 0

    def add(self, layer: int, scores: torch.Tensor) -> None:
        """scores: (B, H, len(SCORES)) from ``score_matrix``."""
        s = scores.sum(0)
        self.sums[layer] = self.sums[layer] + s if layer in self.sums else s

    def rows(self) -> list[dict]:
        rows = []
        for layer in sorted(self.sums):
            acc = self.sums[layer].cpu() / max(self.sequences, 1)
            for h, values in enumerate(acc.tolist()):
                rows.append({"layer": layer, "head": h, **dict(zip(SCORES, values))})
        return rows


# -- random tokens repeated twice ------------------------------------------------------------------
def repeated_random_tokens(vocab_size: int, half: int, n_seqs: int, seed: int, bos: int | None = None,
                           exclude: tuple[int, ...] = (), pool: torch.Tensor | None = None) -> torch.Tensor:
    """(n_seqs, [1 +] 2·half) token ids: BOS (when the tokenizer has one), then r, r with r uniform
    over ``pool`` (the distinct tokens of the data: tokens the model never saw in training, such as
    GPT-2's unused ones, would measure the embedding of noise) or the vocabulary, minus special tokens."""
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    if pool is not None and len(pool):
        allowed[pool[(pool >= 0) & (pool < vocab_size)]] = True
    else:
        allowed[:] = True
    for t in exclude:
        if 0 <= t < vocab_size:
            allowed[t] = False
    pool = allowed.nonzero().flatten()
    r = pool[torch.randint(0, len(pool), (n_seqs, half), generator=gen)]
    parts = [r, r]
    if bos is not None:
        parts.insert(0, torch.full((n_seqs, 1), bos, dtype=r.dtype))
    return torch.cat(parts, dim=1)


def induction_stripe(att: torch.Tensor, half: int, offset: int) -> torch.Tensor:
    """Per-sequence induction score (B, H): mean attention of each second-copy query to the token after
    its first occurrence. ``offset`` is 1 when a BOS token is prepended, else 0."""
    s = att.shape[-1]
    queries = torch.arange(offset + half, s, device=att.device)
    keys = queries - half + 1
    return att[:, :, queries, keys].to(torch.float64).mean(-1)


def icl_loss_drop(logits: torch.Tensor, ids: torch.Tensor, half: int, offset: int) -> dict[str, float]:
    """Next-token cross-entropy on the first copy and on the second copy of random repeated tokens
    (nats), and the drop between them: what the model learns in context."""
    logp = torch.log_softmax(logits[:, :-1].to(torch.float32), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # nll[:, p] predicts token p + 1
    targets = torch.arange(1, ids.shape[1], device=ids.device)
    first = nll[:, (targets > offset) & (targets < offset + half)]  # inside the first copy (its 1st token unpredictable)
    second = nll[:, targets >= offset + half + 1]  # the second copy after its first token
    a, b = float(first.mean()), float(second.mean())
    return {"loss_first_half": a, "loss_second_half": b, "icl_loss_drop": a - b}
