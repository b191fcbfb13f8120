"""Tiny random instances of every text architecture the installed ``transformers`` can build.

Plain helper module (not a test file), used by tests/test_anatomy_families.py and by
scripts/anatomy_coverage.py. A family's real config class is instantiated with its size knobs
shrunk (``SMALL``: few layers, d_model 64, 4 heads, 2 kv heads, vocab 256 ...), only passing the
knobs that the config class itself has, so every other default (layout, activation, layer
pattern) stays the family's own. Hybrids keep one layer of each kind of their layer pattern.
The model is built with its LM head class (causal LM, else masked LM, else seq2seq LM, else the
bare model) and written with ``save_pretrained``, i.e. with the names a real checkpoint has.

Which architectures count as "text" (``text_model_types``): those with a causal-LM, masked-LM or
seq2seq-LM class, minus any that transformers also lists as image-text, multimodal-LM, speech,
CTC, image or visual/document-QA models, or whose config has a vision/audio/speech/image
sub-config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: Size knobs, by the config attribute names families use. Only knobs a config already has are set.
SMALL: dict[str, Any] = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64, "emb_dim": 64, "embed_dim": 64, "n_embed": 64,
    "embedding_size": 64, "word_embed_proj_dim": 64,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "encoder_layers": 2, "decoder_layers": 2,
    "num_decoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
    "num_heads": 4,
    "num_key_value_heads": 2, "n_head_kv": 2, "num_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 16, "d_kv": 16, "attention_head_size": 16, "rotary_dim": 8,
    "intermediate_size": 128, "n_inner": 128, "d_ff": 128, "ffn_dim": 128, "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128, "hidden_dim": 128, "dim_ff": 128, "dim_head": 16, "ffn_hidden_size": 128, "dff": 128,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "expert_intermediate_size": 32,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "n_group": 1, "topk_group": 1,
    "vocab_size": 256, "n_vocab": 256,
    "max_position_embeddings": 128, "n_positions": 128, "n_ctx": 128, "max_seq_len": 128,
    "max_source_positions": 128, "max_target_positions": 128, "block_size": 128,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "mamba_d_state": 8, "state_size": 8, "ssm_state_size": 8, "mamba_n_heads": 8, "mamba_d_head": 16,
    "mamba_head_dim": 16, "mamba_n_groups": 1, "n_groups": 1, "mamba_d_conv": 4, "conv_kernel": 4,
    "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1,
    "num_buckets": 32, "relative_attention_num_buckets": 32, "type_vocab_size": 2,
    # family-specific widths that otherwise keep a tiny model at hundreds of millions of parameters
    "expert_ffn_hidden_size": 32, "zero_expert_num": 2, "entity_vocab_size": 64, "entity_emb_size": 32,
    "d_latents": 64, "num_latents": 16, "hidden_size_global": 64, "encoder_hash_byte_group_vocab": 512,
    "vocab_size_per_layer_input": 256, "hidden_size_per_layer_input": 16, "global_head_dim": 32,
    "cross_attention_hidden_size": 64, "query_pre_attn_scalar": 16, "hc_lowrank": 16, "ple_embed_dim": 64,
}
#: Architectures no tiny instance can be built of, because of transformers itself: the config class
#: rejects every size (not our shrink). The rule: excluded only when the constraint that fails is
#: one transformers imposes on *every* config of the family, stated here. Everything else that does
#: not build counts as a coverage failure.
TRANSFORMERS_CANNOT_BUILD: dict[str, str] = {
    "gemma4_assistant": "the config requires every layer to reuse the target model's KV cache "
                        "(num_kv_shared_layers == num_hidden_layers), which its text config rejects for any size",
    "gemma4_unified_assistant": "same as gemma4_assistant: all layers KV-shared is required and rejected",
}
MAX_PARAMS = 30_000_000  # a config that does not shrink below this is reported, never built on the CPU
PATTERN_KEYS = ("layer_types", "layers_block_type", "block_types", "layer_type", "mlp_layer_types")


def text_model_types() -> list[str]:
    """The text architectures (see the module docstring for the rule), sorted."""
    from transformers.models.auto import configuration_auto as c, modeling_auto as m

    text = (set(m.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(m.MODEL_FOR_MASKED_LM_MAPPING_NAMES)
            | set(m.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES))
    other = set()
    for mapping in ("IMAGE_TEXT_TO_TEXT", "MULTIMODAL_LM", "SPEECH_SEQ_2_SEQ", "CTC", "IMAGE",
                    "VISUAL_QUESTION_ANSWERING", "DOCUMENT_QUESTION_ANSWERING"):
        other |= set(getattr(m, f"MODEL_FOR_{mapping}_MAPPING_NAMES", {}))
    out = []
    for t in sorted(text - other):
        if t == "encoder-decoder":  # a wrapper around two other configs, not an architecture
            continue
        try:
            cls = c.CONFIG_MAPPING[t]
        except (KeyError, ImportError):
            continue
        subs = getattr(cls, "sub_configs", {}) or {}
        if any(w in k for k in subs for w in ("vision", "audio", "speech", "image")):
            continue
        out.append(t)
    return out


def _pattern_overrides(default) -> dict[str, Any]:
    """Hybrids: keep one layer of each kind of the family's own layer pattern."""
    out: dict[str, Any] = {}
    values = default.to_dict()
    for key in PATTERN_KEYS:
        if _read_only(type(default), key):
            continue
        value = values.get(key)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            kinds = list(dict.fromkeys(value))
            if len(kinds) == 1:
                kinds = kinds * 2
            out[key] = kinds
    if len(out) > 1:
        out.pop("layer_types", None)  # derived from the family's own pattern key
    pattern = values.get("hybrid_override_pattern")
    if isinstance(pattern, str) and pattern:
        kinds = "".join(dict.fromkeys(pattern))
        out["hybrid_override_pattern"] = kinds if len(kinds) > 1 else kinds * 2
    attn_idx = values.get("attn_layer_indices")
    if isinstance(attn_idx, (list, tuple)) and attn_idx:
        out["attn_layer_indices"] = [1]
    n = max((len(v) for v in out.values()), default=0)
    if n:
        for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            if key in values:
                out[key] = max(n, 2)
    return out


def tiny_config(model_type: str):
    """The family's real config class with its size knobs shrunk (see SMALL)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    try:
        default = cls()
    except Exception:  # noqa: BLE001 - a config class whose own defaults do not validate (Gemma4 assistants)
        default = cls(**FAMILY_FIXES.get(model_type, {}))
    values = default.to_dict()  # not getattr: per-layer (heterogeneous) configs refuse global reads
    present = set(values)
    kwargs = {k: v for k, v in SMALL.items() if k in present and values.get(k) is not None}
    if "num_key_value_heads" in kwargs and values.get("num_key_value_heads") == values.get("num_attention_heads"):
        kwargs["num_key_value_heads"] = 4  # a family with MHA by default keeps MHA
    if "num_key_value_heads" in present and values.get("num_key_value_heads") is None and "num_attention_heads" in kwargs:
        kwargs["num_key_value_heads"] = 4  # unset kv heads means MHA (Nemotron's default leaves it None)
    for key in getattr(cls, "sub_configs", {}) or {}:  # BLT, T5Gemma: shrink the nested configs the same way
        if isinstance(values.get(key), dict):
            kwargs[key] = _shrink_dict(values[key])
    if values.get("multi_query") and "n_head_kv" in kwargs:
        kwargs.pop("n_head_kv")
    kwargs.update(_pattern_overrides(default))
    if "head_dim" in present and values.get("head_dim") is None:
        kwargs["head_dim"] = 16
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
                "cls_token_id", "mask_token_id", "unk_token_id"):
        value = values.get(key)
        if key in present and isinstance(value, int) and value >= 200:
            kwargs[key] = 3
    for key, value in FAMILY_FIXES.get(model_type, {}).items():
        kwargs[key] = {**kwargs[key], **value} if isinstance(value, dict) and isinstance(kwargs.get(key), dict) else value
    kwargs = {k: v for k, v in kwargs.items() if not _read_only(cls, k)}
    return cls(**kwargs)


def _shrink_dict(values: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    out.update({k: v for k, v in SMALL.items() if k in values and values.get(k) is not None})
    if values.get("num_key_value_heads") is not None and values.get("num_key_value_heads") == values.get(
            "num_attention_heads"):
        out["num_key_value_heads"] = 4
    for key in ("layer_types",):
        if isinstance(values.get(key), list) and values[key]:
            out[key] = list(dict.fromkeys(values[key])) * (2 if len(set(values[key])) == 1 else 1)
            out["num_hidden_layers"] = len(out[key])
    out.pop("per_layer_config", None)
    return out


def _read_only(cls, key: str) -> bool:
    """A derived key (a property, or an ``attribute_map`` alias of one: Bamba's layer_types)."""
    target = (getattr(cls, "attribute_map", None) or {}).get(key, key)
    return isinstance(getattr(cls, key, None), property) or isinstance(getattr(cls, target, None), property)


#: Per-family knobs that the generic shrink cannot guess (each config's own constraints).
FAMILY_FIXES: dict[str, dict[str, Any]] = {
    "reformer": {"is_decoder": True, "axial_pos_shape": [8, 16], "axial_pos_embds_dim": [32, 32], "attn_layers": ["local", "lsh"],
                 "num_hidden_layers": 2, "hidden_size": 64, "feed_forward_size": 128, "attention_head_size": 16,
                 "num_attention_heads": 4},
    "funnel": {"block_sizes": [1, 1], "block_repeats": [1, 1], "num_decoder_layers": 1, "d_head": 16, "d_inner": 128,
               "n_head": 4},
    "xlnet": {"d_inner": 128, "n_head": 4, "d_model": 64},
    "transfo-xl": {},
    "longformer": {"attention_window": [8, 8]},
    "led": {"attention_window": [8, 8]},
    "bigbird_pegasus": {"attention_type": "original_full"},
    "big_bird": {"attention_type": "original_full"},
    "pegasus_x": {"block_size": 8, "num_global_tokens": 4},
    "jamba": {"num_hidden_layers": 2, "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
              "expert_layer_offset": 1, "mamba_dt_rank": 8},
    "bamba": {"attn_layer_indices": [1], "num_hidden_layers": 2},
    "mamba2": {"num_heads": 8, "head_dim": 16, "expand": 2},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "num_layers": 2},
    "zaya": {"num_experts_per_tok": 1},
    "recurrent_gemma": {"lru_width": 64, "attention_window_size": 16},
    "mobilebert": {"embedding_size": 32, "intra_bottleneck_size": 32, "true_hidden_size": 32,
                   "num_feedforward_networks": 1},
    "falcon_h1": {"mamba_d_ssm": 128},
    "gemma3n_text": {"layer_types": ["sliding_attention", "full_attention"] * 2, "num_hidden_layers": 4,
                     "num_kv_shared_layers": 2, "laurel_rank": 8, "altup_num_inputs": 2},
    "gemma4_text": {"num_kv_shared_layers": 0},
    "gemma4_unified_text": {"num_kv_shared_layers": 0},
    "gemma4_assistant": {"text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0,
                                         "enable_moe_block": False, "num_kv_shared_layers": 2, "num_hidden_layers": 2}},
    "gemma4_unified_assistant": {"text_config": {"hidden_size_per_layer_input": 0, "num_kv_shared_layers": 2,
                                                 "num_hidden_layers": 2}},
    "zamba": {"num_hidden_layers": 4, "layers_block_type": ["linear_attention", "hybrid"] * 2},  # the shared block tied twice
    "esm": {"pad_token_id": 1, "mask_token_id": 2, "vocab_size": 256},  # the config's default pad id is None; real ESM uses 1
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 0},  # default layer_types is None
    "dots1": {"num_local_experts": 4, "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2},  # the MoE reads num_local_experts, which the config does not set
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0},
             "ffn_config": {"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 32,
                       "indexer_compress_ratio": 4, "ngram_vocab_size_base": 1024, "split_ngram_parts": 4},
    "squeezebert": {"q_groups": 2, "k_groups": 2, "v_groups": 2, "post_attention_groups": 2, "intermediate_groups": 4,
                    "output_groups": 4},
}


def model_class(config):
    """The family's LM class: causal LM, else masked LM, else seq2seq LM, else the bare model
    (seq2seq first for encoder-decoders)."""
    from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM,
                              AutoModelForSeq2SeqLM)

    autos = [AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM, AutoModel]
    if getattr(config, "is_encoder_decoder", False):
        autos.insert(0, autos.pop(2))  # BART-style: the whole encoder-decoder, not only its decoder
    for auto in autos:
        if type(config) in auto._model_mapping:
            return auto._model_mapping[type(config)]
    raise ValueError(f"no model class for {config.model_type}")


def build_tiny(model_type: str, directory: str | os.PathLike, seed: int = 0, prepare=None):
    """Write a tiny random ``model_type`` checkpoint (safetensors + config.json); return (path, model).

    ``prepare(model)``, if given, may change the weights before they are saved."""
    import torch

    config = tiny_config(model_type)
    cls = model_class(config)
    with torch.device("meta"):
        meta = cls(config)
    n = sum(p.numel() for p in meta.parameters())
    if n > MAX_PARAMS:
        raise ValueError(f"does not shrink: {n:,} parameters")
    torch.manual_seed(seed)
    model = cls(config).eval()
    if prepare is not None:
        prepare(model)
    path = Path(directory)
    model.save_pretrained(path)
    return path, model


def write_config_only(model_type: str, directory) -> Path:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(tiny_config(model_type).to_dict()))
    return path
