"""What each tensor *is*: its role, its layer, the model's dims, and how fused matrices split.

Everything here is table-driven: a new architecture is a few rows in ``ROLE_RULES`` and
``CONFIG_KEYS``, not a new branch. Splitting fused matrices (GPT-2 ``c_attn``, GPT-NeoX's
per-head interleaved ``query_key_value``, Phi-3 ``qkv_proj``/``gate_up_proj``, fused 3-D MoE
experts) lives here once, and every analysis uses it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch

from ..sources.base import TensorInfo

ROLES = (
    "embed.token", "embed.position", "embed.type", "attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv",
    "mlp.up", "mlp.gate", "mlp.down", "mlp.gate_up", "moe.expert.up", "moe.expert.gate", "moe.expert.down",
    "moe.expert.gate_up", "moe.router", "norm", "lm_head", "bias", "other",
)


def _rule(role: str, *suffixes: str) -> tuple[str, re.Pattern]:
    return role, re.compile(r"(?:^|\.)(?:" + "|".join(suffixes) + r")$")


NORM_MODULE = r"(?:ln_?\w*|\w*layer_?norm\w*|\w*_norm|norm|rms_norm\w*|\w*LayerNorm)"

#: Ordered: the first rule whose pattern matches the end of the name wins.
ROLE_RULES: list[tuple[str, re.Pattern]] = [
    _rule("norm", NORM_MODULE + r"\.(?:weight|bias|scale)"),
    _rule("embed.token", r"(?:wte|embed_tokens|word_embeddings|embed_in|tok_embeddings|token_embedding|shared)\.weight"),
    _rule("embed.position", r"(?:wpe|position_embeddings|embed_positions|pos_embedding)\.weight"),
    _rule("embed.type", r"token_type_embeddings\.weight"),
    _rule("lm_head", r"lm_head\.weight", r"embed_out\.weight", r"predictions\.decoder\.weight"),
    _rule("moe.router", r"(?:block_sparse_moe|mlp|moe|feed_forward)\.(?:gate|router)(?:\.layer|\.classifier)?\.weight"),
    _rule("moe.expert.gate", r"experts\.\d+\.(?:w1|gate_proj)\.weight"),
    _rule("moe.expert.up", r"experts\.\d+\.(?:w3|up_proj)\.weight"),
    _rule("moe.expert.down", r"experts\.\d+\.(?:w2|down_proj)\.weight"),
    _rule("moe.expert.gate_up", r"experts\.gate_up_proj(?:\.weight)?"),
    _rule("moe.expert.down", r"experts\.down_proj(?:\.weight)?"),
    _rule("moe.expert.up", r"experts\.up_proj(?:\.weight)?"),
    _rule("attn.qkv", r"(?:c_attn|query_key_value|qkv_proj|Wqkv|qkv)\.weight"),
    _rule("attn.q", r"(?:q_proj|query|wq|q_lin)\.weight"),
    _rule("attn.k", r"(?:k_proj|key|wk|k_lin)\.weight"),
    _rule("attn.v", r"(?:v_proj|value|wv|v_lin)\.weight"),
    _rule("attn.o", r"(?:attn\.c_proj|o_proj|attention\.dense|attention\.output\.dense|out_proj|attention\.wo|self_attn\.dense|out_lin)\.weight"),
    _rule("mlp.gate_up", r"gate_up_proj\.weight"),
    _rule("mlp.gate", r"(?:gate_proj|feed_forward\.w1|mlp\.w1)\.weight"),
    _rule("mlp.up", r"(?:up_proj|c_fc|dense_h_to_4h|intermediate\.dense|fc1|feed_forward\.w3|mlp\.w3|lin1)\.weight"),
    _rule("mlp.down", r"(?:down_proj|mlp\.c_proj|dense_4h_to_h|output\.dense|fc2|feed_forward\.w2|mlp\.w2|lin2)\.weight"),
    ("lm_head", re.compile(r"^output\.weight$")),
]

LAYER_PATTERN = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks|block)\.(\d+)\.")
EXPERT_PATTERN = re.compile(r"experts\.(\d+)\.")

#: (family, test on the set of names) used when there is no config.json.
FAMILY_SIGNATURES: list[tuple[str, Callable[[set[str]], bool]]] = [
    ("gpt_neox", lambda ns: any(n.startswith("gpt_neox.") or ".query_key_value." in n for n in ns)),
    ("phi3", lambda ns: any(".qkv_proj." in n for n in ns)),
    ("mixtral", lambda ns: any(".block_sparse_moe." in n or ".experts." in n for n in ns)),
    ("bert", lambda ns: any(".attention.self.query." in n for n in ns)),
    ("gpt2", lambda ns: any(".attn.c_attn." in n for n in ns)),
    ("qwen2", lambda ns: any(n.endswith("self_attn.q_proj.bias") for n in ns)),
    ("llama", lambda ns: any(n.endswith("self_attn.q_proj.weight") for n in ns)),
]

#: config.json keys per dim, first present wins (HF names, then GPT-2/nanoGPT names, then others).
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "n_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "d_model": ("hidden_size", "n_embd", "d_model", "dim"),
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
    head_dim: int | None = None
    vocab_size: int | None = None
    n_experts: int = 0
    source: str = "config"  # "config", "shapes" or "config+shapes"


@dataclass(frozen=True)
class Part:
    """A matrix the anatomy defines inside a tensor: a q/k/v slice, an expert, or the tensor itself."""

    suffix: str  # "" for the whole tensor, else e.g. "q" or "expert=3,gate"
    role: str
    expert: int | None
    select: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False)
    key: str = ""  # how the slice is cut: part of its store key, so a different cut is a different matrix

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.select is None else self.select(tensor)


@dataclass
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str
    role: str
    layer: int | None
    expert: int | None
    transposed: bool = False  # stored (in, out) as GPT-2's Conv1D does


def shape_text(shape: tuple[int, ...]) -> str:
    """``(30522, 384)`` -> ``"30522×384"``; a 0-d tensor is ``"scalar"``."""
    return "×".join(str(s) for s in shape) if shape else "scalar"


def classify(name: str) -> str:
    is_bias = name.endswith(".bias")
    for role, pattern in ROLE_RULES:
        if pattern.search(name):
            return role
    return "bias" if is_bias else "other"


def layer_of(name: str) -> int | None:
    m = LAYER_PATTERN.search(name)
    return int(m.group(1)) if m else None


def expert_of(name: str) -> int | None:
    m = EXPERT_PATTERN.search(name)
    return int(m.group(1)) if m else None


def detect_family(names: Iterable[str], config: dict[str, Any] | None) -> str:
    if config:
        model_type = config.get("model_type")
        if isinstance(model_type, str) and model_type:
            return model_type
    ns = set(names)
    for family, test in FAMILY_SIGNATURES:
        if test(ns):
            return family
    return "unknown"


@dataclass
class Anatomy:
    family: str
    dims: Dims
    tied_embeddings: bool | None
    entries: dict[str, TensorEntry]
    config: dict[str, Any] | None = None

    # -- summaries ----------------------------------------------------------------------------
    @property
    def parameter_count(self) -> int:
        total = 0
        for e in self.entries.values():
            n = 1
            for s in e.shape:
                n *= s
            total += n
        return total

    def role_counts(self) -> dict[str, int]:
        return dict(Counter(e.role for e in self.entries.values()))

    def dtype_counts(self) -> dict[str, int]:
        return dict(Counter(e.dtype for e in self.entries.values()))

    def by_role(self, role: str) -> list[TensorEntry]:
        return [e for e in self.entries.values() if e.role == role]

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "dims": asdict(self.dims),
            "parameters": self.parameter_count,
            "tensors": len(self.entries),
            "tied_embeddings": self.tied_embeddings,
            "dtypes": self.dtype_counts(),
            "roles": self.role_counts(),
        }

    # -- fused matrices -----------------------------------------------------------------------
    def parts(self, name: str, slices: bool = True) -> list[Part]:
        """The matrices to analyse in tensor ``name``: itself (if a matrix) and its defined slices."""
        e = self.entries[name]
        parts: list[Part] = []
        if len(e.shape) != 3 or not e.role.startswith("moe.expert"):
            parts.append(Part("", e.role, e.expert))
        if not slices:
            return parts
        if e.role == "attn.qkv" and len(e.shape) == 2:
            q, kv = _qkv_sizes(self, e)
            layout = f"qkv:{q}:{kv}:{self.dims.head_dim}:{_is_interleaved(e)}:{e.transposed}"
            for key in ("q", "k", "v"):
                parts.append(Part(key, f"attn.{key}", None, _qkv_selector(self, e, key), f"{layout}:{key}"))
        elif e.role == "mlp.gate_up" and len(e.shape) == 2:
            for i, key in enumerate(("gate", "up")):
                parts.append(Part(key, f"mlp.{key}", None, _halves_selector(i), f"half:{i}"))
        elif e.role.startswith("moe.expert") and len(e.shape) == 3:
            for x in range(e.shape[0]):
                if e.role == "moe.expert.gate_up":
                    for i, key in enumerate(("gate", "up")):
                        parts.append(Part(f"expert={x},{key}", f"moe.expert.{key}", x, _expert_half_selector(x, i),
                                          f"expert:{x}:half:{i}"))
                else:
                    parts.append(Part(f"expert={x}", e.role, x, _expert_selector(x), f"expert:{x}"))
        return parts

    def split_qkv(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """q, k, v of a fused attention matrix, each as (out_features, in_features)."""
        e = self.entries[name]
        return {key: _qkv_selector(self, e, key)(tensor) for key in ("q", "k", "v")}

    def heads(self, matrix: torch.Tensor, kind: str = "q") -> list[torch.Tensor]:
        """Per-head views (head_dim × d_model) of a q/k/v matrix in (out, in) layout."""
        hd = self.dims.head_dim
        if not hd:
            raise ValueError("head_dim unknown for this model")
        return list(matrix.split(hd, dim=0))


def _qkv_sizes(anatomy: Anatomy, e: TensorEntry) -> tuple[int, int]:
    d = anatomy.dims
    total = max(e.shape) if e.transposed else e.shape[0]
    if d.n_heads and d.head_dim:
        q = d.n_heads * d.head_dim
        kv = (d.n_kv_heads or d.n_heads) * d.head_dim
        if q + 2 * kv == total:
            return q, kv
    return total // 3, total // 3


def _qkv_selector(anatomy: Anatomy, e: TensorEntry, key: str) -> Callable[[torch.Tensor], torch.Tensor]:
    q, kv = _qkv_sizes(anatomy, e)
    index = "qkv".index(key)
    interleaved = _is_interleaved(e)
    head_dim = anatomy.dims.head_dim

    def select(t: torch.Tensor) -> torch.Tensor:
        w = t.T if e.transposed else t
        if interleaved and head_dim and w.shape[0] % (3 * head_dim) == 0:
            n_heads = w.shape[0] // (3 * head_dim)
            return w.reshape(n_heads, 3, head_dim, w.shape[1])[:, index].reshape(n_heads * head_dim, w.shape[1])
        bounds = (0, q, q + kv, q + 2 * kv)
        return w[bounds[index]:bounds[index + 1]]

    return select


def _is_interleaved(e: TensorEntry) -> bool:
    """GPT-NeoX stores q, k, v interleaved per head: rows [h0:q k v, h1:q k v, ...]."""
    return e.name.endswith("query_key_value.weight")


def _halves_selector(i: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t.chunk(2, dim=0)[i]


def _expert_selector(x: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t[x]


def _expert_half_selector(x: int, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t[x].chunk(2, dim=0)[i]


# -- building an anatomy ----------------------------------------------------------------------
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


def fill_dims_from_shapes(dims: Dims, entries: dict[str, TensorEntry]) -> None:
    """Infer what config.json did not say from the tensors' shapes (head_dim is a guess then)."""

    def first(role: str) -> TensorEntry | None:
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


def build_anatomy(infos: dict[str, TensorInfo], config: dict[str, Any] | None = None) -> Anatomy:
    family = detect_family(infos, config)
    entries: dict[str, TensorEntry] = {}
    for name, info in infos.items():
        role = classify(name)
        entries[name] = TensorEntry(name, tuple(info.shape), info.dtype, role, layer_of(name), expert_of(name))
    dims = dims_from_config(config)
    if not config:
        dims.source = "shapes"
    _mark_transposed(entries, dims, family)
    before = asdict(dims)
    fill_dims_from_shapes(dims, entries)
    if config and asdict(dims) != before:
        dims.source = "config+shapes"
    return Anatomy(family=family, dims=dims, tied_embeddings=_tied(entries, config, family), entries=entries, config=config)


def _mark_transposed(entries: dict[str, TensorEntry], dims: Dims, family: str) -> None:
    """GPT-2's Conv1D stores (in, out); nanoGPT's nn.Linear stores (out, in) under the same names."""
    for e in entries.values():
        if len(e.shape) != 2 or not re.search(r"\.(c_attn|c_proj|c_fc)\.weight$", e.name):
            continue
        if e.name.endswith("c_attn.weight"):
            e.transposed = e.shape[1] > e.shape[0]
        elif family == "gpt2":
            e.transposed = True
        elif family != "nanogpt" and dims.d_model:
            e.transposed = e.name.endswith("c_fc.weight") and e.shape[0] == dims.d_model


def _tied(entries: dict[str, TensorEntry], config: dict[str, Any] | None, family: str) -> bool | None:
    has_embed = any(e.role == "embed.token" for e in entries.values())
    has_head = any(e.role == "lm_head" for e in entries.values())
    if config and isinstance(config.get("tie_word_embeddings"), bool):
        return config["tie_word_embeddings"]
    if family == "nanogpt":
        return True  # nanoGPT ties wte and lm_head by construction
    if has_embed and not has_head:
        return True if family not in ("bert",) else None
    return None  # decided from the data: see pipeline (equal content hashes)
