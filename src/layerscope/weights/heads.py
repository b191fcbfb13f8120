"""Attention heads as circuits: the QK and OV matrices of every head, never formed.

For query head h (kv head g = h // (n_heads / n_kv_heads) under GQA/MQA):

    QK_h = W_Q,hᵀ W_K,g     (d_model × d_model, rank ≤ head_dim)
    OV_h = W_O,h  W_V,g     (d_model × d_model, rank ≤ head_dim)

Both are ``Lᵀ R`` with L, R of shape head_dim × d_model, and everything we report comes from
head_dim × head_dim products (the factored-matrix trick of TransformerLens' ``FactoredMatrix``):

- singular values: with QR factors Lᵀ = Q₁R₁ and Rᵀ = Q₂R₂, Lᵀ R = Q₁ (R₁R₂ᵀ) Q₂ᵀ, so
  σ(LᵀR) = σ(R₁R₂ᵀ);
- nonzero eigenvalues: those of R Lᵀ (the cyclic property);
- ‖A‖_F² = Σσ², and tr(A²) = tr((R Lᵀ)²), hence ‖A − Aᵀ‖_F² = 2‖A‖_F² − 2 tr(A²).

Circuits need not be square: MobileBERT's queries and keys read the bottleneck while its values read
the full width, and Zamba2's shared attention reads [hidden ; embeddings] (2·d_model) but writes
d_model; OV_h = W_O,h W_V,h then maps d_in to d_out. Singular values, norms and ranks are defined
for any shape; the eigenvalue-based columns (asymmetry, eig_*, top_eig_abs, copying_score) exist
only for a square map and are NaN for a rectangular one, with ``{circuit}_shape`` saying why.

Biases are left out of the circuits. For rotary models (Llama, Qwen2, NeoX, Phi-3 …) the QK
kernel is the pre-rotation one: rotation by position is applied between W_Q and W_K at run time.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch

from ..anatomy import ATTENTION_ROLES, CROSS_ROLES, Anatomy, build_anatomy
from ..anatomy.core import HEADS_3D
from ..config import Config
from ..errors import LayerscopeError
from .metrics.spectral import energy_rank, entropy_rank, spectral_norm
from ..sources import Source, open_source
from .spectrum import Spectrum
from ..store import Store

CIRCUITS = ("qk", "ov")
TOP_EIGS = 8  # complex eigenvalues kept per head and circuit
NONZERO_RTOL = 1e-10  # |λ| below this fraction of max|λ| counts as zero
HEADS_VERSION = "1"


@dataclass
class LayerAttention:
    """One layer's attention weights as float64 (out_features, in_features) matrices."""

    layer: int
    q: torch.Tensor  # (n_heads · head_dim, d_model)
    k: torch.Tensor  # (n_kv_heads · head_dim, d_model)
    v: torch.Tensor  # (n_kv_heads · head_dim, d_model)
    o: torch.Tensor  # (d_model, n_heads · head_dim)
    key: str  # content identity of the four matrices and their head layout
    stack: str = ""  # "encoder" / "decoder" in an encoder-decoder
    cross: bool = False  # cross-attention: queries from the decoder, keys and values from the encoder
    n_heads: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None  # of queries and keys
    v_head_dim: int | None = None  # of values (differs from head_dim in MLA)


@dataclass
class Circuit:
    """A batch of factored circuits A_h = L_hᵀ R_h, h over heads."""

    sv: torch.Tensor  # (H, r) singular values, descending
    eig: torch.Tensor  # (H, r) complex eigenvalues of R Lᵀ
    frobenius_sq: torch.Tensor  # (H,)
    trace_sq: torch.Tensor  # (H,) tr(A²); NaN when A is not square
    shape: tuple[int, int]  # of A: (rows of Lᵀ, columns of R)

    @property
    def square(self) -> bool:
        return self.shape[0] == self.shape[1]


def factored_circuit(left: torch.Tensor, right: torch.Tensor) -> Circuit:
    """Spectral summary of A_h = left_hᵀ right_h for left (H, r, d_out) and right (H, r, d_in).

    A is d_out × d_in; when d_out ≠ d_in it has no eigenvalues, and ``eig`` is empty, ``trace_sq`` NaN."""
    left, right = left.to(torch.float64), right.to(torch.float64)
    r1 = torch.linalg.qr(left.transpose(1, 2), mode="r").R
    r2 = torch.linalg.qr(right.transpose(1, 2), mode="r").R
    sv = torch.linalg.svdvals(r1 @ r2.transpose(1, 2))
    shape = (left.shape[2], right.shape[2])
    if shape[0] == shape[1]:
        small = right @ left.transpose(1, 2)  # R Lᵀ: its eigenvalues are A's nonzero ones
        eig = torch.linalg.eigvals(small)
        trace_sq = (small * small.transpose(1, 2)).sum(dim=(1, 2))
    else:
        eig = torch.zeros(left.shape[0], 0, dtype=torch.complex128)
        trace_sq = torch.full((left.shape[0],), math.nan, dtype=torch.float64)
    return Circuit(sv, eig, (sv**2).sum(dim=1), trace_sq, shape)


def circuit_metrics(c: Circuit, h: int, energy_level: float = 0.99) -> dict[str, Any]:
    """The per-head columns of one circuit (without the circuit-name prefix)."""
    sv = c.sv[h].numpy()
    spec = Spectrum(sv, c.shape, "factored")
    eig = c.eig[h].numpy()
    mags = np.abs(eig)
    top = float(mags.max()) if mags.size else 0.0
    nz = eig[mags > NONZERO_RTOL * top] if top > 0 else eig[:0]
    fro_sq = float(c.frobenius_sq[h])
    asym_sq = max(0.0, 2.0 * fro_sq - 2.0 * float(c.trace_sq[h]))
    order = np.argsort(-np.abs(eig))[:TOP_EIGS]
    total_mag = float(np.abs(nz).sum())
    valid = fro_sq > 0 and sv[0] > 0
    if not c.square:  # no eigenvalues: say so in the row rather than leave bare NaNs
        nan = math.nan
        return {"spectral_norm": spectral_norm(spec) if valid else nan, "frobenius_norm": math.sqrt(fro_sq),
                "entropy_rank": entropy_rank(spec) if valid else nan,
                "energy_rank_99": energy_rank(spec, energy_level) if valid else nan,
                "asymmetry": nan, "eig_real_fraction": nan, "eig_positive_fraction": nan, "top_eig_abs": nan,
                "copying_score": nan, "top_eigs": [],
                "shape": f"{c.shape[0]}x{c.shape[1]}: rectangular, eigenvalue columns undefined (NaN)"}
    return {
        "spectral_norm": spectral_norm(spec) if valid else math.nan,
        "frobenius_norm": math.sqrt(fro_sq),
        "entropy_rank": entropy_rank(spec) if valid else math.nan,
        "energy_rank_99": energy_rank(spec, energy_level) if valid else math.nan,
        "asymmetry": math.sqrt(asym_sq / fro_sq) if fro_sq > 0 else math.nan,
        "eig_real_fraction": float(np.abs(nz.real).sum()) / total_mag if total_mag > 0 else math.nan,
        "eig_positive_fraction": float(np.mean(nz.real > 0)) if nz.size else math.nan,
        "top_eig_abs": top,
        "copying_score": float(nz.real.sum()) / total_mag if total_mag > 0 else math.nan,
        "top_eigs": [[float(eig[i].real), float(eig[i].imag)] for i in order],
    }


# -- reading each layer's attention weights -------------------------------------------------------
@dataclass
class Skipped:
    stack: str
    layer: int
    reason: str


def _blocks(anatomy: Anatomy) -> dict[tuple[str, int, bool], dict[str, Any]]:
    """Attention entries grouped by (stack, layer, cross): {role without prefix: entry}."""
    blocks: dict[tuple[str, int, bool], dict[str, Any]] = {}
    for e in anatomy.entries.values():
        if e.layer is None or not (len(e.shape) == 2 or (len(e.shape) == 3 and e.layout == HEADS_3D)):
            continue
        if e.role in ATTENTION_ROLES or e.role in CROSS_ROLES:
            cross = e.role.startswith("xattn.")
            blocks.setdefault((e.stack, e.layer, cross), {}).setdefault(e.role.split(".", 1)[1], e)
    return blocks


def _spec(anatomy: Anatomy, stack: str, layer: int, cross: bool):
    for s in anatomy.attention:
        if (s.stack, s.layer, s.cross) == (stack, layer, cross):
            return s.n_heads, s.n_kv_heads, s.head_dim, s.mla, s.v_head_dim
    d = anatomy.dims
    if d.stacks.get(stack):
        st = d.stacks[stack]
        return st["n_heads"], st["n_kv_heads"], st["head_dim"], None, None
    mla = None
    if d.kv_lora_rank:
        mla = {"q_lora_rank": d.q_lora_rank or 0, "kv_lora_rank": d.kv_lora_rank,
               "qk_rope_head_dim": d.qk_rope_head_dim or 0, "v_head_dim": d.v_head_dim or 0,
               "qk_nope_head_dim": (d.head_dim or 0) - (d.qk_rope_head_dim or 0)}
    return d.n_heads, d.n_kv_heads or d.n_heads, d.head_dim, mla, d.v_head_dim


def kv_source_layer(config: dict[str, Any] | None, layer: int) -> int | None:
    """The layer whose keys and values layer ``layer`` attends over, when it has none of its own.

    Gemma-3n (``num_kv_shared_layers``): the last ``num_kv_shared_layers`` layers own no k/v projections
    and reuse the k, v *states* of the last earlier layer of the same ``layer_types`` entry (transformers'
    ``kv_sharing_modes``: that layer "stores", they "reuse"). Their QK circuit pairs their own W_Q with that
    layer's W_K: a bilinear form between two residual-stream positions of different depth, like
    cross-attention's. None where the config says nothing of the kind."""
    cfg = config or {}
    cfg = cfg.get("text_config") or cfg
    shared, types = cfg.get("num_kv_shared_layers"), cfg.get("layer_types")
    n = cfg.get("num_hidden_layers")
    if not (isinstance(shared, int) and shared > 0 and isinstance(types, list) and isinstance(n, int)):
        return None
    first = n - shared
    if not (first <= layer < min(n, len(types))):
        return None
    earlier = [i for i in range(first) if types[i] == types[layer]]
    return earlier[-1] if earlier else None


def attention_layers(source: Source, anatomy: Anatomy, skipped: list[Skipped] | None = None) -> Iterator[LayerAttention]:
    """Each softmax-attention block's weights; blocks that cannot be read are appended to ``skipped``."""
    skipped = skipped if skipped is not None else []
    for (stack, layer), reason in anatomy.skipped_layers.items():
        skipped.append(Skipped(stack, layer, reason))
    blocks = _blocks(anatomy)
    for (stack, layer, cross), by_role in blocks.items():  # Gemma-3n: late layers reuse an earlier layer's k, v
        src_layer = kv_source_layer(anatomy.config, layer)
        donor = blocks.get((stack, src_layer, cross)) if src_layer is not None else None
        if donor and not ({"k", "v"} & set(by_role)) and {"k", "v"} <= set(donor):
            by_role["k"], by_role["v"] = donor["k"], donor["v"]
    if not blocks:
        why = f" ({len(anatomy.skipped_layers)} layers without softmax attention)" if anatomy.skipped_layers else ""
        raise LayerscopeError(f"{source.label}: no attention weights found (looked for roles attn.q/k/v/o or attn.qkv){why}")
    order = {"encoder": 0, "": 1, "decoder": 1}
    for (stack, layer, cross) in sorted(blocks, key=lambda k: (order.get(k[0], 2), k[1], k[2])):
        by_role = blocks[(stack, layer, cross)]
        nh, nkv, hd, mla, v_hd = _spec(anatomy, stack, layer, cross)
        try:
            if not nh or not hd:
                raise LayerscopeError("number of attention heads unknown (no config.json and not inferable)")
            att = _read_block(source, anatomy, by_role, stack, layer, cross, nh, nkv or nh, hd, mla, v_hd)
        except LayerscopeError as exc:
            msg = str(exc).removeprefix(f"{source.label}: ")
            skipped.append(Skipped(stack, layer, ("cross-attention: " if cross else "") + msg))
            continue
        yield att


def _read_block(source: Source, anatomy: Anatomy, by_role: dict[str, Any], stack: str, layer: int, cross: bool,
                nh: int, nkv: int, hd: int, mla: dict[str, int] | None, v_hd: int | None) -> LayerAttention:
    hashes: list[str] = []

    def read(role: str) -> torch.Tensor:
        entry = by_role[role]
        t, digest = source.read(entry.name)
        hashes.append(digest)
        w = t.to(torch.float64)
        if entry.layout == HEADS_3D:  # (d_model, n_heads, head_dim): q/k/v read d_model, o writes it
            w = w.reshape(w.shape[0], -1)
            return w if role == "o" else w.T
        return w.T if entry.transposed else w

    where = f"layer {layer}" if not stack else f"{stack} layer {layer}"
    if "o" not in by_role:
        raise LayerscopeError(f"{where} lacks the attention output projection")
    if "kv_b" in by_role and mla:
        q, k, v, layout = _mla_qkv(source, anatomy, by_role, read, layer, nh, mla, hashes)
        nkv, v_hd = nh, mla["v_head_dim"]
    elif "qkv" in by_role:
        entry = by_role["qkv"]
        t, digest = source.read(entry.name)
        hashes.append(digest)
        parts = anatomy.split_qkv(entry.name, t.to(torch.float64))
        q, k, v = parts["q"], parts["k"], parts["v"]
        layout = entry.layout
    elif {"qk", "v"} <= set(by_role):
        # shared query-key (Reformer LSH): k_t = q_t / ‖q_t‖, so QK_h = W_QK,hᵀ W_QK,h before that per-token
        # normalisation (not a weight, left out like RMSNorm's 1/rms)
        q = read("qk")
        k, v = q, read("v")
        layout = "shared_qk"
    elif {"q", "k", "v"} <= set(by_role):
        q, k, v = read("q"), read("k"), read("v")
        layout = ""
    else:
        raise LayerscopeError(f"{where} lacks q/k/v attention weights (found {sorted(by_role)})")
    adapters = [e.name for e in anatomy.entries.values() if e.layer == layer and e.stack == stack
                and any(f"linear_{x}_adapter" in e.name for x in "qkv")]
    if adapters:  # Zamba2's per-block LoRA on the shared q/k/v: the circuit would silently omit it
        raise LayerscopeError(f"{where} attention adds per-layer adapters to q/k/v ({adapters[0]}): not read")
    o = read("o")
    v_hd = v_hd or hd
    if q.shape[0] == 2 * nh * hd and k.shape[0] == nkv * hd:
        # gated queries (Qwen3-Next, Qwen3.5): q_proj gives per head [query (hd) | output gate (hd)]
        q = q.reshape(nh, 2, hd, q.shape[1])[:, 0].reshape(nh * hd, q.shape[1])
        layout = layout or "gated_q"
    if q.shape[0] != nh * hd or k.shape[0] != nkv * hd or v.shape[0] != nkv * v_hd or o.shape[1] != nh * v_hd:
        raise LayerscopeError(
            f"{where} attention shapes q{tuple(q.shape)} k{tuple(k.shape)} o{tuple(o.shape)} "
            f"do not fit {nh} heads × {hd} dims with {nkv} kv heads")
    extra = [] if not (stack or cross or layout or v_hd != hd) else [stack, str(cross), layout, str(v_hd)]
    key = hashlib.sha256("|".join(hashes + [str(nh), str(nkv), str(hd), HEADS_VERSION] + extra).encode()).hexdigest()[:32]
    return LayerAttention(layer, q, k, v, o, key, stack, cross, nh, nkv, hd, v_hd)


def _mla_qkv(source, anatomy, by_role, read, layer, nh, mla, hashes):
    """Multi-head latent attention: each head's query, key and value as (width, d_model) factors.

    q_h = W_qb,h · diag(γ_qa) · W_qa (or q_proj's head rows); k_h = [W_kvb,h(nope) · diag(γ_kva) · W_kva[:r] ;
    W_kva[r:]] (the rope rows of kv_a_proj_with_mqa are one key shared by all heads); v_h = W_kvb,h(v) ·
    diag(γ_kva) · W_kva[:r]. The RMSNorm weights γ are linear and included; the norms' per-token 1/rms
    scale is not a weight and is left out, as the rotation by position is (pre-rotation kernel).
    """
    r, nope, rope, v_hd = mla["kv_lora_rank"], mla["qk_nope_head_dim"], mla["qk_rope_head_dim"], mla["v_head_dim"]
    norms = {e.name.rsplit(".", 2)[-2]: e for e in anatomy.entries.values()
             if e.layer == layer and e.role == "norm" and e.stack == by_role["kv_b"].stack and len(e.shape) == 1
             and e.name.endswith(".weight")}

    def gamma(key: str, size: int) -> torch.Tensor:
        e = norms.get(key)
        if e is None:
            return torch.ones(size, dtype=torch.float64)
        t, digest = source.read(e.name)
        hashes.append(digest)
        return t.to(torch.float64)

    if "q_b" in by_role:
        qa = read("q_a")
        q = read("q_b") @ (gamma("q_a_layernorm", qa.shape[0])[:, None] * qa)
    else:
        q = read("q")
    kva = read("kv_a")
    latent = gamma("kv_a_layernorm", r)[:, None] * kva[:r]
    kvb = read("kv_b").reshape(nh, nope + v_hd, r)
    k_nope = kvb[:, :nope] @ latent  # (nh, nope, d)
    k_rope = kva[r:r + rope].expand(nh, rope, kva.shape[1])
    k = torch.cat([k_nope, k_rope], dim=1).reshape(nh * (nope + rope), -1)
    v = (kvb[:, nope:] @ latent).reshape(nh * v_hd, -1)
    return q, k, v, "mla"


def layer_heads(att: LayerAttention, n_heads: int | None = None, n_kv_heads: int | None = None,
                head_dim: int | None = None, energy_level: float = 0.99) -> list[dict[str, Any]]:
    """Rows (one per query head) of QK and OV circuit metrics for one attention block."""
    n_heads = n_heads or att.n_heads
    n_kv_heads = n_kv_heads or att.n_kv_heads or n_heads
    head_dim = head_dim or att.head_dim
    v_hd = att.v_head_dim or head_dim
    group = n_heads // n_kv_heads
    kv_of = [h // group for h in range(n_heads)]
    wq = att.q.reshape(n_heads, head_dim, -1)
    wk = att.k.reshape(n_kv_heads, head_dim, -1)[kv_of]
    wv = att.v.reshape(n_kv_heads, v_hd, -1)[kv_of]
    wo_t = att.o.T.reshape(n_heads, v_hd, -1)  # W_O,hᵀ: (v_head_dim, d_model) per head
    circuits = {"qk": factored_circuit(wq, wk), "ov": factored_circuit(wo_t, wv)}
    rows = []
    for h in range(n_heads):
        row: dict[str, Any] = {"layer": att.layer, "head": h, "kv_head": kv_of[h]}
        for name, c in circuits.items():
            for key, value in circuit_metrics(c, h, energy_level).items():
                row[f"{name}_{key}"] = value
        rows.append(row)
    return rows


# -- categories: each against a null of random heads of the same shapes ----------------------------
NULL_DRAWS = 64
NULL_SDS = 4.0
RANK_FLOOR = 0.10  # of head_dim
COPY_FLOOR = 0.20  # copying score, whose range is [-1, 1]
CATEGORY_RULE = (
    "Head categories are made against a null: the same metric on {draws} seeded random heads of the same shapes "
    "(Gaussian W_Q, W_K, W_V, W_O blocks of head_dim × d_model; the metrics used are scale-free, so matching the norms "
    "changes nothing). Low-rank / high-rank QK: effective rank below / above the null mean by more than "
    f"{NULL_SDS:g} null standard deviations and by at least {RANK_FLOOR:.0%} of head_dim (the most it can be). "
    f"Copying / anti-copying OV: copying score above / below the null mean by more than {NULL_SDS:g} null standard "
    f"deviations and by at least {COPY_FLOOR:g}."
)


@dataclass
class HeadNull:
    """The null distribution of the scale-free head metrics, for one (head_dim, d_model)."""

    draws: int
    qk_entropy_rank: tuple[float, float]  # mean, sd
    ov_copying_score: tuple[float, float]


def head_null(head_dim: int, d_model: int, draws: int = NULL_DRAWS, seed: int = 0) -> HeadNull:
    """Metrics of ``draws`` random heads: L, R with iid Gaussian entries, shapes (head_dim, d_model)."""
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(draws, head_dim, d_model, generator=g, dtype=torch.float64)
    right = torch.randn(draws, head_dim, d_model, generator=g, dtype=torch.float64)
    c = factored_circuit(left, right)
    rows = [circuit_metrics(c, h) for h in range(draws)]
    stat = lambda key: (float(np.mean([r[key] for r in rows])), float(np.std([r[key] for r in rows], ddof=1)))  # noqa: E731
    return HeadNull(draws, stat("entropy_rank"), stat("copying_score"))


@dataclass
class HeadCategories:
    null: HeadNull
    head_dim: int
    low_rank: list[tuple[int, int]]
    high_rank: list[tuple[int, int]]
    copying: list[tuple[int, int]]
    anti_copying: list[tuple[int, int]]
    rank_bounds: tuple[float, float]  # QK effective rank: low below, high above
    copy_bounds: tuple[float, float]

    @property
    def rule(self) -> str:
        return CATEGORY_RULE.format(draws=self.null.draws)

    def items(self) -> list[tuple[str, list[tuple[int, int]], str]]:
        """(category, heads, its bound in words) for each category."""
        (lo, hi), (clo, chi) = self.rank_bounds, self.copy_bounds
        return [("low-rank QK", self.low_rank, f"QK effective rank < {lo:.3g} of {self.head_dim}"),
                ("high-rank QK", self.high_rank, f"QK effective rank > {hi:.3g} of {self.head_dim}"
                 + (" (impossible: above head_dim)" if hi >= self.head_dim else "")),
                ("copying OV", self.copying, f"OV copying score > {chi:.3g}"),
                ("anti-copying OV", self.anti_copying, f"OV copying score < {clo:.3g}")]


def categorise(table: pd.DataFrame, head_dim: int, d_model: int, seed: int = 0,
               where: Callable[[Any], Any] = lambda r: int(r.layer)) -> HeadCategories:
    """Heads whose QK rank or OV copying score is far from random heads' (see ``CATEGORY_RULE``)."""
    null = head_null(head_dim, d_model, seed=seed)
    mean, sd = null.qk_entropy_rank
    margin = max(NULL_SDS * sd, RANK_FLOOR * head_dim)
    cmean, csd = null.ov_copying_score
    cmargin = max(NULL_SDS * csd, COPY_FLOOR)
    rank_bounds, copy_bounds = (mean - margin, mean + margin), (cmean - cmargin, cmean + cmargin)
    pick = lambda mask: [(where(r), int(r.head)) for r in table[mask.fillna(False)].itertuples()]  # noqa: E731
    ranks, copy = table["qk_entropy_rank"], table["ov_copying_score"]
    return HeadCategories(null, head_dim, pick(ranks < rank_bounds[0]), pick(ranks > rank_bounds[1]),
                          pick(copy > copy_bounds[1]), pick(copy < copy_bounds[0]), rank_bounds, copy_bounds)


def head_label(where: Any, head: int) -> str:
    """"L4 H11" for a single-stack model (never "4.11", which reads as a decimal); with stacks the layer
    label carries the stack: "enc L0 H3", "dec L1 cross H2"."""
    return f"{where} H{head}" if isinstance(where, str) else f"L{where} H{head}"


@dataclass
class HeadsResult:
    table: pd.DataFrame  # one row per (layer, head); *_top_eigs hold [re, im] pairs
    anatomy: Anatomy
    source: Source
    categories: HeadCategories
    skipped: list[Skipped] = field(default_factory=list)  # layers without (readable) softmax attention, and why

    @property
    def low_rank(self) -> list[tuple[int, int]]:
        return self.categories.low_rank

    @property
    def high_rank(self) -> list[tuple[int, int]]:
        return self.categories.high_rank

    def save(self, path) -> None:
        from ..views import write_table

        if str(path).endswith(".json"):
            write_table(self.table, path)
        else:
            write_table(self.table.drop(columns=[c for c in self.table.columns if c.endswith("_top_eigs")]), path)


def heads(source: Any, config: Config | None = None, *, revision: str | None = None, progress: Callable[[int, int, str], None] | None = None,
          **overrides: Any) -> HeadsResult:
    """QK and OV circuit metrics of every head of every layer (see the module docstring)."""
    config = (config or Config()).replace(**overrides)
    src = open_source(source, revision)
    anatomy = build_anatomy(src.infos, src.config)
    d = anatomy.dims
    level = 0.99
    params = json.dumps({"energy_level": level, "top_eigs": TOP_EIGS, "nonzero_rtol": NONZERO_RTOL})
    rows: list[dict[str, Any]] = []
    skipped: list[Skipped] = []
    n_blocks = len(_blocks(anatomy))
    labelled = len(anatomy.stacks) > 1 or any(s.cross for s in anatomy.attention) or any(
        e.role.startswith("xattn.") for e in anatomy.entries.values())
    with Store(config.resolved_store()) as store:
        for i, att in enumerate(attention_layers(src, anatomy, skipped)):
            cached = store.artifact(att.key, "heads", params) if config.cache else None
            if cached is None:
                cached = layer_heads(att, energy_level=level)
                store.put_artifact(att.key, "heads", params, cached)
            if labelled:  # encoder-decoder: which stack, and self- or cross-attention
                cached = [{"stack": att.stack, "attention": "cross" if att.cross else "self", **r} for r in cached]
            rows.extend(cached)
            if progress:
                progress(i + 1, n_blocks, f"layer {att.layer}")
    if not rows:
        reasons = [s.reason for s in skipped if "no softmax attention" not in s.reason] or [s.reason for s in skipped]
        first = reasons[0] if reasons else "no attention blocks"
        raise LayerscopeError(f"{src.label}: no softmax-attention layer could be analysed ({len(skipped)} skipped; "
                              f"first: {first})")
    table = pd.DataFrame(rows)
    def where(r) -> Any:
        if not labelled:
            return int(r.layer)
        from ..views import layer_label

        return layer_label((r.stack or "", int(r.layer), r.attention))

    d_model = int(d.d_model or att.q.shape[1])
    return HeadsResult(table, anatomy, src, categorise(table, d.head_dim, d_model, config.seed, where), skipped)
