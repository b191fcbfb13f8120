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

Biases are left out of the circuits. For rotary models (Llama, Qwen2, NeoX, Phi-3 …) the QK
kernel is the pre-rotation one: rotation by position is applied between W_Q and W_K at run time.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch

from ..anatomy import Anatomy, build_anatomy
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


@dataclass
class Circuit:
    """A batch of factored circuits A_h = L_hᵀ R_h, h over heads."""

    sv: torch.Tensor  # (H, r) singular values, descending
    eig: torch.Tensor  # (H, r) complex eigenvalues of R Lᵀ
    frobenius_sq: torch.Tensor  # (H,)
    trace_sq: torch.Tensor  # (H,) tr(A²)
    d_model: int


def factored_circuit(left: torch.Tensor, right: torch.Tensor) -> Circuit:
    """Spectral summary of A_h = left_hᵀ right_h for left, right of shape (H, r, d)."""
    left, right = left.to(torch.float64), right.to(torch.float64)
    r1 = torch.linalg.qr(left.transpose(1, 2), mode="r").R
    r2 = torch.linalg.qr(right.transpose(1, 2), mode="r").R
    sv = torch.linalg.svdvals(r1 @ r2.transpose(1, 2))
    small = right @ left.transpose(1, 2)  # R Lᵀ: its eigenvalues are A's nonzero ones
    eig = torch.linalg.eigvals(small)
    trace_sq = (small * small.transpose(1, 2)).sum(dim=(1, 2))
    return Circuit(sv, eig, (sv**2).sum(dim=1), trace_sq, left.shape[2])


def circuit_metrics(c: Circuit, h: int, energy_level: float = 0.99) -> dict[str, Any]:
    """The per-head columns of one circuit (without the circuit-name prefix)."""
    sv = c.sv[h].numpy()
    spec = Spectrum(sv, (c.d_model, c.d_model), "factored")
    eig = c.eig[h].numpy()
    mags = np.abs(eig)
    top = float(mags.max()) if mags.size else 0.0
    nz = eig[mags > NONZERO_RTOL * top] if top > 0 else eig[:0]
    fro_sq = float(c.frobenius_sq[h])
    asym_sq = max(0.0, 2.0 * fro_sq - 2.0 * float(c.trace_sq[h]))
    order = np.argsort(-np.abs(eig))[:TOP_EIGS]
    total_mag = float(np.abs(nz).sum())
    valid = fro_sq > 0 and sv[0] > 0
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
def attention_layers(source: Source, anatomy: Anatomy) -> Iterator[LayerAttention]:
    d = anatomy.dims
    if not d.n_heads or not d.head_dim:
        raise LayerscopeError(f"{source.label}: number of attention heads unknown (no config.json and not inferable)")
    layers = sorted({e.layer for e in anatomy.entries.values() if e.layer is not None and e.role.startswith("attn.")})
    if not layers:
        raise LayerscopeError(f"{source.label}: no attention weights found (looked for roles attn.q/k/v/o or attn.qkv)")
    for layer in layers:
        by_role = {e.role: e for e in anatomy.entries.values() if e.layer == layer and e.role.startswith("attn.")
                   and len(e.shape) == 2}
        hashes: list[str] = []

        def read(role: str) -> torch.Tensor:
            entry = by_role[role]
            t, digest = source.read(entry.name)
            hashes.append(digest)
            w = t.to(torch.float64)
            return w.T if entry.transposed else w

        if "attn.qkv" in by_role:
            entry = by_role["attn.qkv"]
            t, digest = source.read(entry.name)
            hashes.append(digest)
            parts = anatomy.split_qkv(entry.name, t.to(torch.float64))
            q, k, v = parts["q"], parts["k"], parts["v"]
        elif {"attn.q", "attn.k", "attn.v"} <= set(by_role):
            q, k, v = read("attn.q"), read("attn.k"), read("attn.v")
        else:
            raise LayerscopeError(f"{source.label}: layer {layer} lacks q/k/v attention weights (found {sorted(by_role)})")
        if "attn.o" not in by_role:
            raise LayerscopeError(f"{source.label}: layer {layer} lacks the attention output projection")
        o = read("attn.o")
        hd, nh = d.head_dim, d.n_heads
        nkv = d.n_kv_heads or nh
        if q.shape[0] != nh * hd or k.shape[0] != nkv * hd or o.shape[1] != nh * hd:
            raise LayerscopeError(
                f"{source.label}: layer {layer} attention shapes q{tuple(q.shape)} k{tuple(k.shape)} o{tuple(o.shape)} "
                f"do not fit {nh} heads × {hd} dims with {nkv} kv heads")
        key = hashlib.sha256("|".join(hashes + [str(nh), str(nkv), str(hd), HEADS_VERSION]).encode()).hexdigest()[:32]
        yield LayerAttention(layer, q, k, v, o, key)


def layer_heads(att: LayerAttention, n_heads: int, n_kv_heads: int, head_dim: int,
                energy_level: float = 0.99) -> list[dict[str, Any]]:
    """Rows (one per query head) of QK and OV circuit metrics for one layer."""
    group = n_heads // n_kv_heads
    kv_of = [h // group for h in range(n_heads)]
    wq = att.q.reshape(n_heads, head_dim, -1)
    wk = att.k.reshape(n_kv_heads, head_dim, -1)[kv_of]
    wv = att.v.reshape(n_kv_heads, head_dim, -1)[kv_of]
    wo_t = att.o.T.reshape(n_heads, head_dim, -1)  # W_O,hᵀ: (head_dim, d_model) per head
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


def categorise(table: pd.DataFrame, head_dim: int, d_model: int, seed: int = 0) -> HeadCategories:
    """Heads whose QK rank or OV copying score is far from random heads' (see ``CATEGORY_RULE``)."""
    null = head_null(head_dim, d_model, seed=seed)
    mean, sd = null.qk_entropy_rank
    margin = max(NULL_SDS * sd, RANK_FLOOR * head_dim)
    cmean, csd = null.ov_copying_score
    cmargin = max(NULL_SDS * csd, COPY_FLOOR)
    rank_bounds, copy_bounds = (mean - margin, mean + margin), (cmean - cmargin, cmean + cmargin)
    pick = lambda mask: [(int(r.layer), int(r.head)) for r in table[mask.fillna(False)].itertuples()]  # noqa: E731
    ranks, copy = table["qk_entropy_rank"], table["ov_copying_score"]
    return HeadCategories(null, head_dim, pick(ranks < rank_bounds[0]), pick(ranks > rank_bounds[1]),
                          pick(copy > copy_bounds[1]), pick(copy < copy_bounds[0]), rank_bounds, copy_bounds)


def head_label(layer: int, head: int) -> str:
    return f"L{layer} H{head}"


@dataclass
class HeadsResult:
    table: pd.DataFrame  # one row per (layer, head); *_top_eigs hold [re, im] pairs
    anatomy: Anatomy
    source: Source
    categories: HeadCategories

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
    n_layers = d.n_layers or 0
    with Store(config.resolved_store()) as store:
        for i, att in enumerate(attention_layers(src, anatomy)):
            cached = store.artifact(att.key, "heads", params) if config.cache else None
            if cached is None:
                cached = layer_heads(att, d.n_heads, d.n_kv_heads or d.n_heads, d.head_dim, level)
                store.put_artifact(att.key, "heads", params, cached)
            rows.extend(cached)
            if progress:
                progress(i + 1, n_layers, f"layer {att.layer}")
    table = pd.DataFrame(rows)
    d_model = int(d.d_model or att.q.shape[1])
    return HeadsResult(table, anatomy, src, categorise(table, d.head_dim, d_model, config.seed))
