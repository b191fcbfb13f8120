"""The model's dims: from config.json, from the skeleton's attention modules, or from shapes.

config.json gives the sizes; the attention modules' own attributes (read through the skeleton)
give the head layout where the config's generic keys would mislead (T5's ``d_kv``, BART's
``encoder_attention_heads``, GPT-Neo's ``num_heads``, MQA in Falcon / StarCoder, MLA); shapes fill
what is left when there is no config at all (head_dim is a guess then).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: config.json keys per dim, first present wins (HF names, then GPT-2/nanoGPT names, then others).
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "n_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "d_model": ("hidden_size", "n_embd", "d_model", "dim", "emb_dim"),
    "d_ff": ("intermediate_size", "n_inner", "ffn_dim", "hidden_dim"),
    "n_heads": ("num_attention_heads", "n_head", "n_heads"),
    "n_kv_heads": ("num_key_value_heads", "n_head_kv", "n_kv_heads", "multi_query_group_num"),
    "head_dim": ("head_dim",),
    "vocab_size": ("vocab_size", "n_vocab"),
    "n_experts": ("num_local_experts", "num_experts", "n_routed_experts"),
}
HEAD_DIM_GUESSES = (128, 64, 96, 80, 256, 160, 32, 48, 16, 8)


@dataclass
class Dims:
    n_layers: int | None = None
    d_model: int | None = None
    d_ff: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None  # per-head width of queries and keys (MLA: qk_nope_head_dim + qk_rope_head_dim)
    vocab_size: int | None = None
    n_experts: int = 0
    source: str = "config"  # "config", "shapes" or "config+shapes"
    v_head_dim: int | None = None  # MLA only: per-head width of values
    q_lora_rank: int | None = None  # MLA only (0: queries are a plain q_proj)
    kv_lora_rank: int | None = None  # MLA only
    qk_rope_head_dim: int | None = None  # MLA only: the rotary part of head_dim, from the shared k_rope rows
    attention_layers: list[int] | None = None  # hybrids: the layers with softmax attention (None: unknown/all)
    stacks: dict[str, dict[str, Any]] = field(default_factory=dict)  # encoder-decoder: the dims of each stack


def dims_from_config(config: dict[str, Any] | None) -> Dims:
    dims = Dims(source="config")
    if not config:
        return dims
    nested = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
    for cfg in ([config, nested] if nested else [config]):
        for attr, keys in CONFIG_KEYS.items():
            if getattr(dims, attr) not in (None, 0):
                continue
            for key in keys:
                value = cfg.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    setattr(dims, attr, value)
                    break
    if dims.d_ff is None and dims.d_model and config.get("model_type") in ("gpt2", "nanogpt"):
        dims.d_ff = 4 * dims.d_model
    if dims.head_dim is None and dims.d_model and dims.n_heads:
        dims.head_dim = dims.d_model // dims.n_heads
    if dims.n_kv_heads is None and dims.n_heads:
        dims.n_kv_heads = dims.n_heads
    return dims


def fill_dims_from_shapes(dims: Dims, entries) -> None:
    """Infer what config.json did not say from the tensors' shapes (head_dim is a guess then)."""

    def first(role: str):
        return next((e for e in entries.values() if e.role == role and len(e.shape) >= 2), None)

    embed = first("embed.token") or first("lm_head")
    if embed is not None:
        if dims.vocab_size is None:
            dims.vocab_size = embed.shape[0]
        if dims.d_model is None:
            dims.d_model = embed.shape[1]
    layers = [e.layer for e in entries.values() if e.layer is not None]
    if dims.n_layers is None and layers:
        dims.n_layers = max(layers) + 1
    d = dims.d_model
    if dims.d_ff is None and d:
        for role, factor in (("mlp.up", 1), ("mlp.gate", 1), ("mlp.gate_up", 2), ("moe.expert.up", 1), ("moe.expert.gate_up", 2)):
            e = first(role)
            if e is not None:
                other = [s for s in e.shape[-2:] if s != d] or [e.shape[-2]]
                dims.d_ff = other[0] // factor
                break
    if dims.n_experts == 0:
        experts = {e.expert for e in entries.values() if e.expert is not None}
        stacked = [e.shape[0] for e in entries.values() if e.role.startswith("moe.expert") and len(e.shape) == 3]
        if experts or stacked:
            dims.n_experts = (len(experts) if experts else stacked[0])
    if d and (dims.n_heads is None or dims.head_dim is None):
        q, k = first("attn.q"), first("attn.k")
        q_out = q.shape[0] if q is not None else d
        kv_out = k.shape[0] if k is not None else q_out
        for hd in ([dims.head_dim] if dims.head_dim else HEAD_DIM_GUESSES):
            if q_out % hd == 0 and kv_out % hd == 0 and hd <= q_out:
                dims.head_dim, dims.n_heads, dims.n_kv_heads = hd, q_out // hd, kv_out // hd
                break
    if dims.n_kv_heads is None and dims.n_heads:
        dims.n_kv_heads = dims.n_heads


def apply_attention_record(dims: Dims, rec) -> None:
    """Head layout from an attention module of the skeleton (its own attributes)."""
    if rec.n_heads:
        dims.n_heads = rec.n_heads
    if rec.head_dim:
        dims.head_dim = rec.head_dim
    if rec.n_kv_heads:
        dims.n_kv_heads = rec.n_kv_heads
    elif rec.n_heads:
        dims.n_kv_heads = rec.n_heads
    if rec.mla:
        dims.v_head_dim = rec.mla["v_head_dim"] or None
        dims.q_lora_rank = rec.mla["q_lora_rank"]
        dims.kv_lora_rank = rec.mla["kv_lora_rank"] or None
        dims.qk_rope_head_dim = rec.mla["qk_rope_head_dim"]
