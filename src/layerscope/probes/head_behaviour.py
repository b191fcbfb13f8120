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


def sequence_scores(att: torch.Tensor, ids: torch.Tensor, patterns: dict[str, torch.Tensor] | None = None,
                    eps: float = SINK_EPS) -> dict[str, torch.Tensor]:
    """Every per-sequence score of one layer: ``att`` (B, H, S, S) -> {name: (B, H)} (float64)."""
    a = att.to(torch.float32)
    patterns = patterns if patterns is not None else detection_patterns(ids)
    total = a.sum(dim=(-1, -2)).to(torch.float64)
    out = {"prev_token": a.diagonal(offset=-1, dim1=-2, dim2=-1).sum(-1).to(torch.float64) / total}
    for name, mask in patterns.items():
        out[name] = torch.einsum("bhij,bij->bh", a, mask.to(a.dtype)).to(torch.float64) / total
    first = a[:, :, 1:, 0]
    out["first_token_share"] = first.mean(-1).to(torch.float64)
    out["sink_position_rate"] = (first > eps).to(torch.float64).mean(-1)
    ent = -torch.special.xlogy(a[:, :, 1:], a[:, :, 1:]).sum(-1)
    out["attention_entropy"] = ent.mean(-1).to(torch.float64)
    return out


@dataclass
class HeadAccumulator:
    """Running sums of per-sequence scores, per layer: memory O(layers × heads)."""

    sums: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    sequences: int = 0

    def add(self, layer: int, scores: dict[str, torch.Tensor]) -> None:
        acc = self.sums.setdefault(layer, {})
        for name, v in scores.items():
            s = v.sum(0).cpu()
            acc[name] = acc[name] + s if name in acc else s

    def rows(self) -> list[dict]:
        rows = []
        for layer in sorted(self.sums):
            acc = self.sums[layer]
            n_heads = len(next(iter(acc.values())))
            for h in range(n_heads):
                rows.append({"layer": layer, "head": h,
                             **{name: float(v[h]) / max(self.sequences, 1) for name, v in acc.items()}})
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
