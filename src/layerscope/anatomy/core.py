"""What each tensor *is*: its role, its stack and layer, the model's dims, and how fused matrices split.

Two paths (``Anatomy.path`` says which one a checkpoint took):

- ``skeleton``: config.json names a ``model_type`` the installed ``transformers`` knows. The model
  is built on the meta device (skeleton.py), each checkpoint tensor is mapped onto its parameter
  (prefixes such as ``model.`` / ``transformer.`` / ``bert.`` may differ), and the owning module's
  kind (attention, cross-attention, SSM mixer, MoE, MLP) picks the table its inner name is read
  with (names.py). Layers, stacks, GPT-2 ``Conv1D`` layouts and head layouts come from the tree.
- ``names``: no config, nanoGPT, an unknown type, or a tensor the skeleton does not have (e.g.
  per-expert names that ``save_pretrained`` writes for in-memory fused experts): the name rules
  plus shape reasoning.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch

from ..sources.base import TensorInfo
from . import fused
from .dims import Dims, apply_attention_record, dims_from_config, fill_dims_from_shapes
from .names import ATTENTION_ROLES, CROSS_ROLES, ROLES, classify, classify_in_context, expert_of, layer_of, stack_of

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
CONTEXT_PRECEDENCE = ("attn", "xattn", "mixer", "moe", "mlp")


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
    stack: str = ""  # "encoder" / "decoder" in an encoder-decoder, else ""
    layout: str = ""  # fused q|k|v layout (fused.py), "" for anything else


@dataclass
class AttentionSpec:
    """One softmax-attention block: where it is and its head layout."""

    stack: str
    layer: int
    cross: bool
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mla: dict[str, int] | None = None
    v_head_dim: int | None = None


def shape_text(shape: tuple[int, ...]) -> str:
    """``(30522, 384)`` -> ``"30522×384"``; a 0-d tensor is ``"scalar"``."""
    return "×".join(str(s) for s in shape) if shape else "scalar"


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
    path: str = "names"  # "skeleton" (transformers' module tree) or "names" (name rules + shapes)
    attention: list[AttentionSpec] = field(default_factory=list)  # from the skeleton; else derived from dims
    skipped_layers: dict[tuple[str, int], str] = field(default_factory=dict)  # layers without softmax attention
    shared_layers: bool = False  # ALBERT: one set of layer weights used by every layer

    # -- summaries ----------------------------------------------------------------------------
    @property
    def parameter_count(self) -> int:
        """Floating-point weights, as ``sum(p.numel() for p in model.parameters())`` counts them.

        Integer/bool tensors a checkpoint carries (BERT's int64 ``position_ids``, GPT-2's old causal-mask
        buffers, float in nanoGPT) are buffers, not parameters: they are listed apart (``buffers``). A tied LM head that the
        file stores a second time (nanoGPT, GPT-2 ``.bin``) is one parameter tensor, counted once."""
        total = sum(_numel(e.shape) for e in self.entries.values() if _is_weight(e))
        return total - sum(_numel(e.shape) for e in self.tied_head_entries())

    def buffers(self) -> dict[str, int]:
        """Non-floating tensors (name -> element count): buffers such as ``position_ids``, not weights."""
        return {e.name: _numel(e.shape) for e in self.entries.values() if not _is_weight(e)}

    def tied_head_entries(self) -> list[TensorEntry]:
        """LM-head tensors stored beside a token embedding they are tied to (the same matrix twice)."""
        if self.tied_embeddings is not True:
            return []
        embeds = {e.shape for e in self.by_role("embed.token")}
        return [e for e in self.by_role("lm_head") if e.shape in embeds and _is_weight(e)]

    def role_counts(self) -> dict[str, int]:
        return dict(Counter(e.role for e in self.entries.values()))

    def dtype_counts(self) -> dict[str, int]:
        return dict(Counter(e.dtype for e in self.entries.values()))

    def by_role(self, role: str) -> list[TensorEntry]:
        return [e for e in self.entries.values() if e.role == role]

    @property
    def stacks(self) -> list[str]:
        order = ("encoder", "decoder", "")
        return sorted({e.stack for e in self.entries.values()}, key=lambda s: (order.index(s) if s in order else 2, s))

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "dims": asdict(self.dims),
            "parameters": self.parameter_count,
            "buffers": self.buffers(),
            "tensors": len(self.entries),
            "tied_embeddings": self.tied_embeddings,
            "dtypes": self.dtype_counts(),
            "roles": self.role_counts(),
            "anatomy_path": self.path,
            "shared_layers": self.shared_layers,
        }

    # -- fused matrices -----------------------------------------------------------------------
    def spec_for(self, e: TensorEntry) -> tuple[int | None, int | None, int | None]:
        """(n_heads, n_kv_heads, head_dim) of the attention block holding entry ``e``."""
        cross = e.role.startswith("xattn.")
        for s in self.attention:
            if s.stack == e.stack and s.layer == e.layer and s.cross == cross:
                return s.n_heads, s.n_kv_heads, s.head_dim
        d = self.dims
        return d.n_heads, d.n_kv_heads, d.head_dim

    def _qkv_key(self, e: TensorEntry) -> str:
        nh, nkv, hd = self.spec_for(e)
        total = max(e.shape) if e.transposed else e.shape[0]
        q, kv = fused.qkv_sizes(total, nh, nkv, hd)
        layout = e.layout or "split"
        if layout in ("split", "per_head"):  # keys of the first layouts stay as they were (stored results)
            return f"qkv:{q}:{kv}:{self.dims.head_dim if layout == 'split' else hd}:{layout == 'per_head'}:{e.transposed}"
        return f"qkv:{layout}:{nh}:{nkv}:{hd}:{e.transposed}"

    def parts(self, name: str, slices: bool = True) -> list[Part]:
        """The matrices to analyse in tensor ``name``: itself (if a matrix) and its defined slices."""
        e = self.entries[name]
        parts: list[Part] = []
        if len(e.shape) != 3 or not e.role.startswith(("moe.expert", "moe.shared")):
            parts.append(Part("", e.role, e.expert))
        if not slices:
            return parts
        if e.role in ("attn.qkv", "xattn.qkv") and len(e.shape) == 2:
            layout = self._qkv_key(e)
            prefix = e.role.split(".")[0]
            for key in ("q", "k", "v"):
                parts.append(Part(key, f"{prefix}.{key}", None, self._selector(e, key), f"{layout}:{key}"))
        elif e.role in ("mlp.gate_up", "moe.shared.gate_up") and len(e.shape) == 2:
            prefix = e.role.rsplit(".", 1)[0]
            for i, key in enumerate(("gate", "up")):
                parts.append(Part(key, f"{prefix}.{key}", None, fused.halves_selector(i), f"half:{i}"))
        elif e.role.startswith(("moe.expert", "moe.shared")) and len(e.shape) == 3:
            for x in range(e.shape[0]):
                if e.role.endswith("gate_up"):
                    base = e.role.rsplit(".", 1)[0]
                    for i, key in enumerate(("gate", "up")):
                        parts.append(Part(f"expert={x},{key}", f"{base}.{key}", x, fused.expert_half_selector(x, i),
                                          f"expert:{x}:half:{i}"))
                else:
                    parts.append(Part(f"expert={x}", e.role, x, fused.expert_selector(x), f"expert:{x}"))
        return parts

    def _selector(self, e: TensorEntry, key: str) -> Callable[[torch.Tensor], torch.Tensor]:
        nh, nkv, hd = self.spec_for(e)
        return fused.qkv_selector(e.layout or "split", key, nh, nkv, hd, e.transposed)

    def split_qkv(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """q, k, v of a fused attention matrix, each as (out_features, in_features)."""
        e = self.entries[name]
        return {key: self._selector(e, key)(tensor) for key in ("q", "k", "v")}

    def heads(self, matrix: torch.Tensor, kind: str = "q") -> list[torch.Tensor]:
        """Per-head views (head_dim × d_model) of a q/k/v matrix in (out, in) layout."""
        hd = self.dims.head_dim
        if not hd:
            raise ValueError("head_dim unknown for this model")
        return list(matrix.split(hd, dim=0))


# -- building an anatomy ----------------------------------------------------------------------
def build_anatomy(infos: dict[str, TensorInfo], config: dict[str, Any] | None = None) -> Anatomy:
    family = detect_family(infos, config)
    entries: dict[str, TensorEntry] = {}
    for name, info in infos.items():
        role = classify(name)
        entries[name] = TensorEntry(name, tuple(info.shape), info.dtype, role, layer_of(name), expert_of(name))
    dims = dims_from_config(config)
    if not config:
        dims.source = "shapes"
    skeleton = None
    if config and family not in ("nanogpt", "unknown"):
        from .skeleton import build_skeleton

        skeleton = build_skeleton(config)
    attention: list[AttentionSpec] = []
    if skeleton is not None:
        _apply_skeleton(entries, skeleton, dims)
        attention = _attention_specs(skeleton, dims)
    else:
        stacks = {stack_of(n) for n in entries if entries[n].layer is not None}
        if {"encoder", "decoder"} <= stacks:
            for e in entries.values():
                e.stack = stack_of(e.name)
        _mark_transposed(entries, dims, family)
    before = asdict(dims)
    fill_dims_from_shapes(dims, entries)
    if config and asdict(dims) != before:
        dims.source = "config+shapes"
    for e in entries.values():
        if e.role in ("attn.qkv", "xattn.qkv") and not e.layout:
            e.layout = fused.qkv_layout(family, config, e.name)
    anatomy = Anatomy(family=family, dims=dims, tied_embeddings=_tied(entries, config, family), entries=entries,
                      config=config, path="skeleton" if skeleton is not None else "names", attention=attention,
                      shared_layers=bool(skeleton and skeleton.shared_layers))
    _finish_attention(anatomy)
    return anatomy


def _map_names(names: Iterable[str], params: list[str], modules: Iterable[str] = (),
               saved: dict[str, list[tuple[str, int]]] | None = None) -> dict[str, str]:
    """Checkpoint name -> skeleton parameter name, allowing a different head/prefix (``model.``, ``bert.``).

    Names ``save_pretrained`` writes differently from the module tree are first read through
    transformers' own conversion (``saved``, see skeleton._saved_names); a name still unknown (e.g.
    Kimi's ``forget_gate.f_a_proj`` written ``f_a_proj``) is placed under its deepest enclosing module
    that the skeleton does have."""
    names = list(names)
    exact = set(params)
    out: dict[str, str] = {}
    if saved:
        hits = _map_tails([n for n in names if n not in exact], list(saved))
        out = {n: saved[s][0][0] for n, s in hits.items()}
    out.update(_map_tails([n for n in names if n not in out], params))
    rest = [n for n in names if n not in out]
    if rest and modules:
        mods = [m for m in modules if m]
        for n in rest:
            parts = n.split(".")
            for cut in range(len(parts) - 2, 1, -1):
                hit = _map_tails([".".join(parts[:cut])], mods).get(".".join(parts[:cut]))
                if hit:
                    out[n] = hit + "." + ".".join(parts[cut:])
                    break
    return out


def _map_tails(names: Iterable[str], params: list[str]) -> dict[str, str]:
    exact = set(params)
    index: dict[str, str | None] = {}
    for p in params:
        parts = p.split(".")
        for k in range(0, min(3, len(parts) - 1)):
            tail = ".".join(parts[k:])
            if tail in index and index[tail] != p:
                index[tail] = None  # ambiguous (an encoder and a decoder both have it)
            else:
                index.setdefault(tail, p)
    out: dict[str, str] = {}
    for n in names:
        if n in exact:
            out[n] = n
            continue
        parts = n.split(".")
        for j in range(0, min(3, len(parts) - 1)):
            hit = index.get(".".join(parts[j:]))
            if hit:
                out[n] = hit
                break
    return out


def _context(skeleton, owner: str) -> tuple[str, str] | None:
    """The owning module's kind: the innermost attention ancestor wins, then mixer, MoE, MLP."""
    found: dict[str, str] = {}
    path = owner
    while True:
        ctx = skeleton.contexts.get(path)
        if ctx is not None and ctx[0] not in found:
            found[ctx[0]] = path
        if not path:
            break
        path = path.rsplit(".", 1)[0] if "." in path else ""
    for kind in CONTEXT_PRECEDENCE:
        if kind in found:
            return kind, found[kind]
    return None


def _fused_groups(names: Iterable[str], saved: dict[str, list[tuple[str, int]]]) -> dict[str, list[tuple[str, int]]]:
    """Checkpoint names that hold several module parameters concatenated (HRM's gqkv_proj)."""
    many = [s for s, group in saved.items() if len(group) > 1 and len({p for p, _ in group}) == len(group)]
    return {n: saved[s] for n, s in _map_tails(names, many).items()} if many else {}


def _fused_role(kind: str, inner_roles: list[str], group: list[tuple[str, int]]) -> tuple[str, str] | None:
    """(role, layout) of a concatenation of attention projections: q, k, v (and gates) by row range."""
    prefix = "xattn" if kind == "xattn" else "attn"
    bounds, at = {}, 0
    for role, (_, rows) in zip(inner_roles, group):
        bounds.setdefault(role.split(".")[-1], (at, at + rows))
        at += rows
    if {"q", "k", "v"} <= set(bounds):
        return f"{prefix}.qkv", "rows:" + ":".join(f"{bounds[k][0]}:{bounds[k][1]}" for k in "qkv")
    return None


HEADS_3D = "d_model,heads,head_dim"  # layout of a 3-D attention projection (XLNet): W[:, h, :] is head h


def _apply_skeleton(entries: dict[str, TensorEntry], skeleton, dims: Dims) -> None:
    saved = getattr(skeleton, "saved", None) or {}
    mapping = _map_names(entries, skeleton.param_names, skeleton.layers, saved)
    fused_groups = _fused_groups([n for n in entries if n not in set(skeleton.param_names)], saved)
    d_model = dims.d_model
    for name, e in entries.items():
        pname = mapping.get(name)
        if pname is None:
            continue
        owner = pname.rsplit(".", 1)[0] if "." in pname else ""
        rec = skeleton.modules.get(owner)
        anchor = owner
        while anchor not in skeleton.layers and "." in anchor:
            anchor = anchor.rsplit(".", 1)[0]
        stack, layer = skeleton.layers.get(anchor, ("", None))
        e.stack, e.layer = stack, layer
        e.transposed = bool(rec and rec.kind == "conv1d")
        if rec is not None and rec.kind == "norm":
            e.role = "norm"
            continue
        if rec is not None and rec.kind == "embedding" and e.role not in ("other", "bias"):
            continue
        ctx = _context(skeleton, anchor)
        if ctx is None:
            if e.role == "other" and layer is not None and rec is not None and (
                    len(e.shape) == 2 or (rec.kind == "conv" and rec.in_features)):
                e.role = _by_shape("mlp", rec, d_model) or e.role
            continue
        kind, ctx_path = ctx
        inner = pname[len(ctx_path) + 1:] if ctx_path else pname
        role = classify_in_context(kind, inner)
        if role is None and owner == ctx_path and kind in ("attn", "xattn") and len(e.shape) == 3 and inner in ("q", "k", "v", "o") \
                and e.shape[0] == d_model:
            # XLNet's q, k, v, o are bare (d_model, n_heads, head_dim) parameters used by einsum
            role, e.layout = f"{'xattn' if kind == 'xattn' else 'attn'}.{inner}", HEADS_3D
        if role is None:
            if rec is None and len(e.shape) == 2 and kind in ("mlp", "mixer", "attn", "xattn", "moe"):
                role = {"mixer": "ssm.aux", "attn": "attn.aux", "xattn": "xattn.aux", "moe": "moe.aux",
                        "mlp": "mlp.aux"}[kind]
            elif len(e.shape) <= 1 or rec is None or rec.kind not in ("linear", "conv1d", "conv"):
                role = {"mixer": "ssm.param", "attn": "attn.aux", "xattn": "xattn.aux", "moe": "moe.aux",
                        "mlp": "mlp.aux"}[kind]
                if kind == "moe" and e.role.startswith("moe."):
                    role = e.role
            else:
                role = _by_shape(kind, rec, d_model)
        if role == "bias" and e.role == "norm":
            role = "norm"
        group = fused_groups.get(name)
        if group and kind in ("attn", "xattn"):
            inner_roles = [classify_in_context(kind, p[len(ctx_path) + 1:] if ctx_path else p) or "" for p, _ in group]
            fused_role = _fused_role(kind, inner_roles, group)
            if fused_role:
                role, e.layout = fused_role
        e.role = role
        if e.role.startswith("moe.expert") and e.expert is None:
            e.expert = expert_of(name)


def _by_shape(kind: str, rec, d_model: int | None) -> str:
    """Shape reasoning for a Linear whose name no table knows, inside a module of known kind."""
    if kind == "mlp" and d_model:
        if rec.in_features == d_model and rec.out_features != d_model:
            return "mlp.up"
        if rec.out_features == d_model and rec.in_features != d_model:
            return "mlp.down"
    return {"attn": "attn.aux", "xattn": "xattn.aux", "mixer": "ssm.aux", "moe": "moe.aux", "mlp": "mlp.aux"}[kind]


def _attention_specs(skeleton, dims: Dims) -> list[AttentionSpec]:
    specs = []
    first = None
    stack_first: dict[str, Any] = {}
    for rec in skeleton.attention.values():
        if rec.layer is None or not rec.n_heads or not rec.head_dim:
            continue
        kv = rec.n_kv_heads or rec.n_heads
        specs.append(AttentionSpec(rec.stack, rec.layer, rec.cross, rec.n_heads, kv, rec.head_dim, rec.mla,
                                   (rec.mla or {}).get("v_head_dim") or None))
        if not rec.cross:
            first = first or rec
            stack_first.setdefault(rec.stack, rec)
    if first is not None:
        apply_attention_record(dims, first)
    if len(skeleton.stacks) > 1:
        for stack, rec in stack_first.items():
            dims.stacks[stack] = {"n_layers": skeleton.n_layers.get(stack), "n_heads": rec.n_heads,
                                  "n_kv_heads": rec.n_kv_heads or rec.n_heads, "head_dim": rec.head_dim}
    main = skeleton.stacks[-1] if skeleton.stacks else ""
    att_layers = sorted({s.layer for s in specs if s.stack == main and not s.cross})
    n = skeleton.n_layers.get(main)
    if n and att_layers != list(range(n)):
        dims.attention_layers = att_layers
    return specs


def _finish_attention(anatomy: Anatomy) -> None:
    """Layers with no softmax attention (SSM / linear-attention / convolution mixers) and why."""
    layered: dict[tuple[str, int], set[str]] = {}
    for e in anatomy.entries.values():
        if e.layer is not None:
            layered.setdefault((e.stack, e.layer), set()).add(e.role)
    with_attn = {(s.stack, s.layer) for s in anatomy.attention if not s.cross}
    for key, roles in sorted(layered.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if key in with_attn or roles & set(ATTENTION_ROLES):
            continue
        if any(r.startswith("ssm.") for r in roles):
            anatomy.skipped_layers[key] = "no softmax attention (SSM / linear-attention / convolution mixer)"
        elif roles & set(CROSS_ROLES):
            continue
        elif any(r.startswith(("mlp.", "moe.")) for r in roles):
            anatomy.skipped_layers[key] = "no attention weights in this layer"


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


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


#: GPT-2-style causal-mask buffers saved with the weights: ``attn.bias`` (1, 1, T, T) — float in
#: nanoGPT checkpoints without flash attention — and ``attn.masked_bias`` (a scalar); never weights.
_CAUSAL_MASK = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")


def _is_weight(e: TensorEntry) -> bool:
    """Floating point (float16/bfloat16/float32/float64/float8_*): a weight; int/bool, and a causal
    mask saved as floats: a buffer."""
    if _CAUSAL_MASK.search(e.name) and len(e.shape) in (0, 4):
        return False
    return "float" in e.dtype.lower()


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


__all__ = ["ROLES", "Anatomy", "AttentionSpec", "Dims", "Part", "TensorEntry", "build_anatomy", "classify",
           "detect_family", "dims_from_config", "expert_of", "layer_of", "shape_text"]
