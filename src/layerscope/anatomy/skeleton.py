"""transformers' own description of a model: its module tree, built on the meta device.

When config.json names a ``model_type`` that the installed ``transformers`` knows, the model class
is instantiated under ``torch.device("meta")`` (no memory, no weights, never ``trust_remote_code``)
and its module tree says what names cannot: which module owns a projection (an attention, a
cross-attention, an SSM / linear-attention mixer, an MLP, an expert block), each Linear's in/out
features, GPT-2-style ``Conv1D`` layouts, the attention modules' own ``num_heads`` /
``num_key_value_heads`` / ``head_dim``, which layers of a hybrid have softmax attention, and which
stack (encoder / decoder) a layer belongs to. Building is the expensive bit (importing transformers
alone is ~1 s), so a skeleton is cached per config in memory and on disk (its facts as JSON, keyed by
the transformers version and the config's text). ``transformers`` is imported here only, on a miss.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

#: Class names of softmax-attention modules (innermost module owning the projections).
ATTENTION_CLASS = re.compile(r"Attention|Attn", re.I)
#: Non-softmax mixers: analysed as matrices (roles ssm.*), never as attention heads.
MIXER_CLASS = re.compile(r"Mamba|DeltaNet|DeltaAttention|LinearAttention|LightningAttention|ShortConv|RecurrentBlock|Rglru|"
                         r"Rwkv|RWKV|Lstm|LSTM|Hyena|Retention|FNet|Fourier|mLSTM|sLSTM|KimiDelta|Lfm2Conv|GatedConv",
                         re.I)
NOT_ATTENTION_CLASS = re.compile(r"Output$|Layer$|Block$|Pool|Intermediate|Norm$", re.I)
MOE_CLASS = re.compile(r"Moe|MoE|Experts?$|Sparse|Switch|Router|TopK", re.I)
MLP_CLASS = re.compile(r"MLP|FeedForward|FFN|Ffn|FF$|DenseReluDense|DenseActDense|DenseGatedActDense|GatedAct|"
                       r"Intermediate|Output$|PositionWise|Expert", re.I)
CROSS_PATH = re.compile(r"(?:^|\.)(?:encoder_attn|crossattention|cross_attn|cross_attention|EncDecAttention|src_attn|"
                        r"encoder_decoder_attention|inter_attn|cross_attention_layer)(?:\.|$)")
HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "attention_heads")
KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_head_kv")
HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "d_head", "key_value_proj_dim", "qk_head_dim", "dim_head")
EXPERT_LIST = re.compile(r"(?:^|\.)(?:experts|local_experts|expert|mlp_experts)$")


@dataclass
class ModuleRecord:
    """One parameter-owning module of the skeleton."""

    path: str
    cls: str
    kind: str  # "linear", "conv1d" (GPT-2 Conv1D: weight stored (in, out)), "embedding", "norm", "conv", "other"
    in_features: int | None = None
    out_features: int | None = None


@dataclass
class AttentionRecord:
    """A softmax-attention module and its head layout."""

    path: str
    cls: str
    stack: str
    layer: int | None
    cross: bool
    n_heads: int | None
    n_kv_heads: int | None
    head_dim: int | None
    mla: dict[str, int] | None = None  # q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim


@dataclass
class Skeleton:
    model_type: str
    model_class: str
    modules: dict[str, ModuleRecord]
    contexts: dict[str, tuple[str, str]]  # module path -> (context kind, context module path)
    attention: dict[str, AttentionRecord]  # by attention module path
    layers: dict[str, tuple[str, int | None]]  # module path -> (stack, layer)
    param_names: list[str]
    stacks: list[str]
    n_layers: dict[str, int] = field(default_factory=dict)  # per stack
    shared_layers: bool = False  # ALBERT: one set of weights used by every layer
    #: the names ``save_pretrained`` writes -> the module parameters each holds, in order, with their row
    #: counts (transformers' own weight conversion: HRM's fused gqkv_proj, Bailing's attention -> self_attn)
    saved: dict[str, list[tuple[str, int]]] = field(default_factory=dict)


def _int_attr(obj: Any, names: tuple[str, ...]) -> int | None:
    for n in names:
        v = getattr(obj, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def build_skeleton(config: dict[str, Any] | None) -> Skeleton | None:
    """The skeleton for ``config`` (a config.json dict), or None when transformers cannot build it."""
    if not config or not isinstance(config.get("model_type"), str):
        return None
    try:
        text = json.dumps(config, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return None
    return _cached(text)


@lru_cache(maxsize=16)
def _cached(config_text: str) -> Skeleton | None:
    path = _disk_path(config_text)
    if path is not None:
        hit = _load(path)
        if hit is not _MISS:
            return hit
    try:
        skeleton = _build(json.loads(config_text))
    except Exception:  # noqa: BLE001 - an unbuildable config falls back to the name rules
        skeleton = None
    if path is not None:
        _save(path, skeleton)
    return skeleton


# -- the on-disk cache: the skeleton's facts (not the model), so a second `info` skips transformers --------
CACHE_FORMAT = 2  # bump when Skeleton's fields or the way they are read change
_MISS = object()


def _disk_path(config_text: str):
    """``<cache dir>/skeletons/<sha256(format, transformers version, config)>.json``, or None (no
    transformers installed, or LAYERSCOPE_SKELETON_CACHE=0). The version comes from the package
    metadata, which is cheap; importing transformers is what the cache avoids."""
    import hashlib
    import os
    from importlib import metadata

    if os.environ.get("LAYERSCOPE_SKELETON_CACHE", "1") == "0":
        return None
    try:
        version = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None
    from ..config import Config

    key = hashlib.sha256(f"{CACHE_FORMAT}\0{version}\0{config_text}".encode()).hexdigest()
    return Config().resolved_store().parent / "skeletons" / f"{key}.json"


def _load(path) -> Skeleton | None | object:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return _MISS
    try:
        if data.get("skeleton") is None:
            return None
        d = data["skeleton"]
        return Skeleton(
            d["model_type"], d["model_class"], {k: ModuleRecord(**v) for k, v in d["modules"].items()},
            {k: tuple(v) for k, v in d["contexts"].items()},
            {k: AttentionRecord(**v) for k, v in d["attention"].items()},
            {k: tuple(v) for k, v in d["layers"].items()}, list(d["param_names"]), list(d["stacks"]),
            dict(d["n_layers"]), bool(d["shared_layers"]),
            {k: [tuple(x) for x in v] for k, v in d["saved"].items()})
    except (KeyError, TypeError, ValueError, AttributeError):
        return _MISS  # an older or damaged entry: rebuild and overwrite it


def _save(path, skeleton: Skeleton | None) -> None:
    """Written atomically (temp file + rename), so a concurrent reader never sees half a file."""
    import os
    from dataclasses import asdict

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"skeleton": asdict(skeleton) if skeleton is not None else None}))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache dir only costs the rebuild


def _model_class(transformers, cfg, config: dict[str, Any]):
    for arch in config.get("architectures") or []:
        cls = getattr(transformers, str(arch), None) if isinstance(arch, str) and arch.isidentifier() else None
        if cls is not None and getattr(cls, "config_class", None) is type(cfg):
            return cls
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    autos = [AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM, AutoModel]
    if getattr(cfg, "is_encoder_decoder", False):
        autos.insert(0, autos.pop(2))
    for auto in autos:
        if type(cfg) in auto._model_mapping:
            return auto._model_mapping[type(cfg)]
    return None


def _build(config: dict[str, Any]) -> Skeleton | None:
    import torch
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config["model_type"]
    try:
        cfg_cls = CONFIG_MAPPING[model_type]
    except KeyError:
        return None
    kwargs = {k: _decode(v) for k, v in config.items() if k not in ("auto_map", "transformers_version")
              and not isinstance(getattr(cfg_cls, k, None), property)}  # derived keys (layers_block_type) are read-only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            cfg = cfg_cls.from_dict(kwargs)
            cls = _model_class(transformers, cfg, config)
            if cls is None:
                return None
            with torch.device("meta"):
                model = cls(cfg)
        finally:
            hf_logging.set_verbosity(level)
    return _read(model, model_type, cls.__name__, cfg)


def _decode(value: Any) -> Any:
    """transformers writes non-finite floats to config.json as {"__float__": "Infinity"}."""
    if isinstance(value, dict):
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _kind(mod) -> tuple[str, int | None, int | None]:
    import torch

    cls = type(mod).__name__
    w = getattr(mod, "weight", None)
    if isinstance(mod, torch.nn.Linear):
        return "linear", mod.in_features, mod.out_features
    if cls == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2:
        return "conv1d", w.shape[0], w.shape[1]
    if isinstance(mod, torch.nn.Embedding):
        return "embedding", mod.num_embeddings, mod.embedding_dim
    if "norm" in cls.lower():
        return "norm", None, None
    if isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d)):
        k = mod.kernel_size
        if all(x == 1 for x in k):  # a pointwise convolution is a (block-diagonal if grouped) Linear: SqueezeBERT
            return "conv", mod.in_channels, mod.out_channels
        return "conv", None, None
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        return "linear", w.shape[1], w.shape[0]
    return "other", None, None


def _read(model, model_type: str, class_name: str, cfg) -> Skeleton:
    import torch

    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    modules: dict[str, ModuleRecord] = {}
    named = dict(model.named_modules())
    for path, mod in named.items():
        if any(True for _ in mod.parameters(recurse=False)):
            kind, fin, fout = _kind(mod)
            modules[path] = ModuleRecord(path, type(mod).__name__, kind, fin, fout)
    param_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]

    # layers: index in the outermost ModuleList of blocks (not an expert list) on the path
    layer_lists = [p for p, m in named.items() if isinstance(m, torch.nn.ModuleList) and not EXPERT_LIST.search(p)
                   and len(m) and all(isinstance(c, torch.nn.Module) for c in m)]
    layers: dict[str, tuple[str, int | None]] = {}
    n_layers: dict[str, int] = {}
    stacks: list[str] = []
    # several sibling stacks of blocks that are not encoder/decoder (HRM's H_module / L_module, BLT's
    # local encoder / global transformer): each is a stack named by the module holding its list
    blocks = [p for p in layer_lists if any(True for _ in named[p][0].children())]  # blocks, not lists of Linears
    top = [p for p in blocks if not any(p.startswith(q + ".") for q in layer_lists if q != p)]
    own_names = len(top) > 1 and len({_stack_of(p + ".") for p in top}) < len(top)
    for path in named:
        stack = _stack_of(path)
        layer = None
        for lst in layer_lists:
            prefix = lst + "." if lst else ""
            if path.startswith(prefix) and path != lst:
                rest = path[len(prefix):].split(".", 1)[0]
                if rest.isdigit():
                    layer = int(rest)
                    if own_names and lst in top and not stack:
                        parts = lst.split(".")
                        stack = parts[-2] if len(parts) > 1 and parts[-2] not in ("model", "transformer") else parts[-1]
                    break  # parents come first: the outermost list of blocks
        layers[path] = (stack, layer)
        if layer is not None:
            n_layers[stack] = max(n_layers.get(stack, 0), layer + 1)
            if stack not in stacks:
                stacks.append(stack)
    if len(stacks) < 2:  # one stack of layers (BERT's "encoder", or none named): no stack label
        layers = {p: ("", layer) for p, (_, layer) in layers.items()}
        n_layers = {"": max(n_layers.values())} if n_layers else {}
        stacks = [""]

    contexts: dict[str, tuple[str, str]] = {}
    attention: dict[str, AttentionRecord] = {}
    # class names carry the family's name (GraniteMoeHybrid..., KimiLinear...): match on what follows it
    family_prefix = re.sub(r"(?:For[A-Z]\w*|Model|LMHeadModel|WithLMHead\w*)$", "", class_name)
    for path, mod in named.items():
        cls = type(mod).__name__
        if family_prefix and cls.startswith(family_prefix) and cls != family_prefix:
            cls = cls[len(family_prefix):]
        kind = None
        if MIXER_CLASS.search(cls):
            kind = "mixer"
        elif ATTENTION_CLASS.search(cls) and not NOT_ATTENTION_CLASS.search(cls):
            kind = "attn"
        elif MOE_CLASS.search(cls) and not ATTENTION_CLASS.search(cls):
            kind = "moe"
        elif MLP_CLASS.search(cls) and not ATTENTION_CLASS.search(cls):
            kind = "mlp"
        if kind is None:
            continue
        if kind == "attn":
            cross = bool(CROSS_PATH.search(path)) or "cross" in cls.lower() or "encdec" in cls.lower() or bool(
                getattr(mod, "is_cross_attention", False))
            if cross:
                kind = "xattn"
        contexts[path] = (kind, path)
        if kind in ("attn", "xattn") and _owns_projections(mod):
            attention[path] = _attention_record(path, mod, text_cfg, layers[path], kind == "xattn")
    # nested attention wrappers (T5LayerSelfAttention around T5Attention): the innermost one describes the heads
    attention = {p: a for p, a in attention.items() if not any(q.startswith(p + ".") for q in attention)}
    skeleton = Skeleton(model_type, class_name, modules, contexts, attention, layers, param_names, stacks or [""],
                        n_layers, shared_layers=_shared(model_type, text_cfg, n_layers), saved=_saved_names(model))
    return skeleton


def _saved_names(model) -> dict[str, list[tuple[str, int]]]:
    """What ``save_pretrained`` calls each parameter, following transformers' own reverse conversion
    (``revert_weight_conversion``) with provenance: saved name -> [(module parameter, rows)], only
    where the name changes. Empty when this transformers has no conversions for the model."""
    try:
        from copy import deepcopy

        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (PrefixChange, WeightConverter, WeightRenaming, apply_converters,
                                                     apply_renamings)

        conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    except Exception:  # noqa: BLE001 - older transformers: names are saved as they are
        return {}
    if not conversions:
        return {}
    out: dict[str, list[tuple[str, int]]] = {}
    try:
        reverse = [c.reverse_transform() for c in conversions[::-1]]
        renamings = [c for c in reverse if isinstance(c, WeightRenaming)]
        converters = [c for c in reverse if isinstance(c, WeightConverter)]
        by_pattern = {k: c for c in converters for k in c.source_patterns}
        groups: dict[str, Any] = {}
        members: dict[str, list[str]] = {}
        params = dict(model.named_parameters())
        for name in sorted(params):
            renamed, pattern = apply_converters(name, converters)
            if pattern is None:
                saved = apply_renamings(name, renamings)
                if saved != name:
                    out[saved] = [(name, int(params[name].shape[0]) if params[name].dim() else 1)]
                continue
            conv = groups.setdefault(renamed, deepcopy(by_pattern[pattern]))
            conv.add_tensor(renamed, name, pattern, params[name])
            members.setdefault(renamed, []).append(name)
        for first, conv in groups.items():
            realized = conv.convert(first, model=model, config=model.config)
            names = members[first]
            rows = [(n, int(params[n].shape[-2]) if params[n].dim() >= 2 else 1) for n in names]
            for target in realized:
                out[apply_renamings(target, renamings)] = rows
    except Exception:  # noqa: BLE001 - a conversion we cannot replay on meta tensors: keep what was found
        pass
    return out


def _stack_of(path: str) -> str:
    m = re.search(r"(?:^|\.)(encoder|decoder)(?:\.|$)", path)
    return m.group(1) if m else ""


def _owns_projections(mod) -> bool:
    import torch

    linears = 0
    for child in mod.modules():
        if child is mod:
            continue
        w = getattr(child, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and not isinstance(child, torch.nn.Embedding):
            linears += 1
    own = [p for p in mod.parameters(recurse=False) if p.dim() >= 2]
    return linears >= 2 or bool(own)


def _attention_record(path: str, mod, cfg, where: tuple[str, int | None], cross: bool) -> AttentionRecord:
    modcfg = getattr(mod, "config", None)
    nh = _int_attr(mod, HEAD_ATTRS) or (_int_attr(modcfg, ("num_attention_heads",)) if modcfg is not None else None)
    if nh is None:
        nh = _int_attr(cfg, ("decoder_attention_heads" if where[0] == "decoder" else "encoder_attention_heads",
                             "num_attention_heads", "n_head", "num_heads"))
    hd = _int_attr(mod, HEAD_DIM_ATTRS)
    kv = _int_attr(mod, KV_ATTRS)
    groups = getattr(mod, "num_key_value_groups", None)
    if kv is None and isinstance(groups, int) and groups > 0 and nh:
        kv = nh // groups
    if hd is None and nh:
        hidden = _int_attr(cfg, ("hidden_size", "d_model", "n_embd"))
        hd = hidden // nh if hidden else None
    if kv is None and nh and hd:
        kv = _kv_from_shapes(mod, nh, hd)
    mla = None
    names = {n for n, _ in mod.named_children()}
    if "kv_b_proj" in names and ("kv_a_proj_with_mqa" in names or "kv_a_proj" in names):
        mla = {k: int(getattr(mod, k, None) or getattr(cfg, k, 0) or 0)
               for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")}
        hd = mla["qk_nope_head_dim"] + mla["qk_rope_head_dim"]
        kv = nh
    return AttentionRecord(path, type(mod).__name__, where[0], where[1], cross, nh, kv, hd, mla)


def _kv_from_shapes(mod, nh: int, hd: int) -> int | None:
    """Shape reasoning: k rows / head_dim, or a fused q|k|v of nh·hd + 2·kv·hd rows (MQA / GQA)."""
    import torch

    for name, child in mod.named_children():
        w = getattr(child, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        out = w.shape[1] if type(child).__name__ == "Conv1D" else w.shape[0]
        if re.fullmatch(r"k_proj|key|k|wk|k_lin|key_proj", name) and out % hd == 0:
            return out // hd
        if re.fullmatch(r"c_attn|query_key_value|qkv_proj|Wqkv|qkv", name) and (out - nh * hd) % (2 * hd) == 0:
            return max(1, (out - nh * hd) // (2 * hd))
    return None


def _shared(model_type: str, cfg, n_layers: dict[str, int]) -> bool:
    """ALBERT-style weight sharing: fewer stored layers than the config runs."""
    groups = getattr(cfg, "num_hidden_groups", None)
    total = getattr(cfg, "num_hidden_layers", None)
    return isinstance(groups, int) and isinstance(total, int) and groups < total
