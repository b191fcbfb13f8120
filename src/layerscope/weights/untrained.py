"""Embedding rows that look untrained, so hubs, neighbours and clusters do not mistake them for structure.

Rows of tokens that never (or almost never) occur in the training data keep their initialisation plus
the updates every such row receives alike (weight decay, the push-down of an unseen token's logit in
a tied output layer). They end up close to each other and to nothing meaningful: the "hubs" and the
second cosine mode of a vocabulary are often these rows. The rule (``RULE``):

1. by name: reserved placeholder tokens (``[unused12]``, ``<unused3>``, ``<|reserved_special_token_7|>``,
   ``madeupword0``); for a byte-level vocabulary without a tokenizer (256 rows, e.g. nanoGPT on raw
   bytes), the 13 byte values that never occur in UTF-8 text (0xC0, 0xC1, 0xF5–0xFF);
2. by similarity to those: when at least 8 rows are marked by name and they form a tight group (mean
   cosine to their centroid ≥ 0.5 — the shared drift of untrained rows; random rows would give ~1/√n),
   every other row whose cosine to that centroid is within 4 standard deviations of the named rows'
   mean cosine, and whose norm lies within the named rows' norm range, is marked too (rare tokens
   that training barely touched: on MiniLM, single characters of rare scripts).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

NAME_PATTERN = re.compile(r"^(\[unused\d+\]|<unused\d+>|<\|reserved_special_token_\d+\|>|madeupword\d+)$")
INVALID_UTF8_BYTES = (0xC0, 0xC1, *range(0xF5, 0x100))
MIN_REFERENCE = 8
TIGHT_COSINE = 0.5
BAND_SDS = 4.0
RULE = (
    "Untrained-looking rows: (1) by name, reserved placeholder tokens ([unused…], <unused…>, "
    "<|reserved_special_token_…|>, madeupword…), or, for a 256-entry byte vocabulary without a tokenizer, the 13 bytes "
    "that never occur in UTF-8 text (0xC0, 0xC1, 0xF5–0xFF); (2) when at least 8 rows are marked by name and they "
    "form a tight group (mean cosine to their centroid ≥ 0.5), every row whose cosine to that centroid is within 4 "
    "standard deviations of the named rows' mean cosine and whose norm is inside the named rows' range."
)


@dataclass
class Untrained:
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # sorted row ids
    by_name: int = 0
    by_similarity: int = 0

    def __post_init__(self) -> None:
        self._set = set(int(i) for i in self.ids)

    def __contains__(self, token_id: int) -> bool:
        return int(token_id) in self._set

    def __len__(self) -> int:
        return len(self.ids)

    def summary(self) -> dict:
        return {"count": len(self), "by_name": self.by_name, "by_similarity": self.by_similarity, "rule": RULE}


def named_ids(vocab, n_rows: int) -> np.ndarray:
    """Rows marked by name (step 1 of the rule)."""
    tok = vocab.tokenizer
    if tok is None:
        if vocab.byte_level and n_rows == 256:
            return np.array(INVALID_UTF8_BYTES, dtype=np.int64)
        return np.zeros(0, dtype=np.int64)
    ids = [i for i in range(n_rows) if (piece := tok.id_to_token(i)) and NAME_PATTERN.match(piece)]
    return np.array(ids, dtype=np.int64)


def untrained_rows(x: torch.Tensor, vocab) -> Untrained:
    """Apply ``RULE`` to the rows of the embedding ``x`` (V × d) decoded by ``vocab``."""
    named = named_ids(vocab, x.shape[0])
    if len(named) < MIN_REFERENCE:
        return Untrained(named, len(named), 0)
    x64 = x.detach().to(torch.float64)
    norms = torch.linalg.vector_norm(x64, dim=1).numpy()
    unit = x64.numpy() / np.maximum(norms, 1e-300)[:, None]
    centre = unit[named].mean(axis=0)
    centre /= max(float(np.linalg.norm(centre)), 1e-300)
    cos = unit @ centre
    if float(cos[named].mean()) < TIGHT_COSINE:
        return Untrained(named, len(named), 0)
    lo_norm, hi_norm = norms[named].min(), norms[named].max()
    band = float(cos[named].mean()) - BAND_SDS * float(cos[named].std())
    close = (cos >= band) & (norms >= lo_norm) & (norms <= hi_norm)
    ids = np.union1d(named, np.nonzero(close)[0]).astype(np.int64)
    return Untrained(ids, len(named), len(ids) - len(named))
