"""How fused q|k|v matrices are laid out, family by family, and how to cut them.

Layouts (rows of the (out, in) matrix):

- ``split``: [q (n_heads·hd) | k (n_kv·hd) | v (n_kv·hd)] — GPT-2 ``c_attn``, Phi-3 ``qkv_proj``,
  ModernBERT / MPT / DBRX ``Wqkv``, StarCoder (``gpt_bigcode``) multi-query ``c_attn``, Falcon-7B
  multi-query ``query_key_value`` (n_heads+2 blocks of hd);
- ``per_head``: [h0: q k v, h1: q k v, ...] — GPT-NeoX, BLOOM, Persimmon, classic Falcon (MHA),
  ``gpt_bigcode`` without multi-query;
- ``grouped``: [g0: q·(n_heads/n_kv) k v, g1: ...] — Falcon ``new_decoder_architecture`` (40B/180B GQA);
- ``mp4``: CodeGen's four model-parallel blocks, each [q | v | k] (note the order);
- ``rows:q0:q1:k0:k1:v0:v1``: explicit row ranges, read from transformers' own conversion of a
  checkpoint tensor into module parameters (HRM's ``gqkv_proj`` = [gate | q | k | v]).

Every analysis reads these cuts through :meth:`Anatomy.parts` / :meth:`Anatomy.split_qkv`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

PER_HEAD_FAMILIES = ("gpt_neox", "bloom", "persimmon", "gpt_neox_japanese")


def qkv_layout(family: str, config: dict[str, Any] | None, name: str) -> str:
    cfg = config or {}
    if family == "falcon":
        if cfg.get("new_decoder_architecture"):
            return "grouped"
        return "split" if cfg.get("multi_query", True) else "per_head"
    if family == "gpt_bigcode":
        return "split" if cfg.get("multi_query", True) else "per_head"
    if family == "codegen":
        return "mp4"
    if family in PER_HEAD_FAMILIES or name.endswith("query_key_value.weight"):
        return "per_head"
    return "split"


def qkv_sizes(total: int, n_heads: int | None, n_kv: int | None, head_dim: int | None) -> tuple[int, int]:
    if n_heads and head_dim:
        q = n_heads * head_dim
        kv = (n_kv or n_heads) * head_dim
        if q + 2 * kv == total:
            return q, kv
    return total // 3, total // 3


def qkv_selector(layout: str, key: str, n_heads: int | None, n_kv: int | None, head_dim: int | None,
                 transposed: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function cutting ``key`` (q, k or v) out of a fused matrix, returned (out, in)."""
    index = "qkv".index(key)

    def select(t: torch.Tensor) -> torch.Tensor:
        w = t.T if transposed else t
        rows, cols = w.shape
        hd = head_dim
        if layout == "per_head" and hd and rows % (3 * hd) == 0:
            n = rows // (3 * hd)
            return w.reshape(n, 3, hd, cols)[:, index].reshape(n * hd, cols)
        if layout == "grouped" and hd and n_heads and n_kv and rows == (n_heads + 2 * n_kv) * hd:
            g = n_heads // n_kv
            blocks = w.reshape(n_kv, g + 2, hd, cols)
            part = blocks[:, :g] if key == "q" else blocks[:, g + index - 1:g + index]
            return part.reshape(-1, cols)
        if layout.startswith("rows:"):
            b = [int(x) for x in layout.split(":")[1:]]
            return w[b[2 * index]:b[2 * index + 1]]
        if layout == "mp4" and rows % 12 == 0:
            local = rows // 12
            order = {"q": 0, "v": 1, "k": 2}[key]
            return w.reshape(4, 3, local, cols)[:, order].reshape(4 * local, cols)
        q, kv = qkv_sizes(rows, n_heads, n_kv, hd)
        bounds = (0, q, q + kv, q + 2 * kv)
        return w[bounds[index]:bounds[index + 1]]

    return select


def halves_selector(i: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t.chunk(2, dim=0)[i]


def expert_selector(x: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t[x]


def expert_half_selector(x: int, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t[x].chunk(2, dim=0)[i]
