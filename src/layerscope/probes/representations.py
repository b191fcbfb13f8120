"""Geometry of the hidden states, layer by layer, and how similar layers are (debiased linear CKA).

Per layer (0 = the embeddings' output, l = the output of block l), over every token state h of the data:

* ``norm_mean``: mean ‖h‖; ``norm_growth``: its ratio to the previous layer's.
* ``anisotropy``: mean cosine over all pairs of distinct token states, exactly, from the running sum
  of unit vectors: (‖Σ u‖² − n) / (n(n − 1)). 0 for isotropic states, near 1 when all share a direction.
* ``effective_rank``: exp of the entropy of the normalised eigenvalues of the state covariance
  (Roy & Vetterli 2007), from running float64 sums of h and h hᵀ.

CKA: debiased linear CKA (Nguyen, Raghu & Kornblith 2021: the unbiased HSIC estimator of Song et al.
2012 in place of the biased one) between every pair of layers, on the states of a seeded sample of
token positions (the same positions in every layer; ``cka_tokens`` of them spread over the batches),
computed in float64. With n sampled tokens and width d it uses n × n Gram matrices when n < d and d × d
cross-products otherwise (Kornblith's feature-space form), whichever is cheaper; both are tested
against a NumPy float64 reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class RepresentationAccumulator:
    n: int = 0
    norm_sum: dict[int, float] = field(default_factory=dict)
    unit_sum: dict[int, torch.Tensor] = field(default_factory=dict)
    first: dict[int, torch.Tensor] = field(default_factory=dict)
    second: dict[int, torch.Tensor] = field(default_factory=dict)
    sample: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def add(self, layer: int, states: torch.Tensor, picked: torch.Tensor | None) -> None:
        # one batch's sums in the states' precision (float32: relative error ~1e-7 over a batch),
        # accumulated across batches in float64
        x = states.reshape(-1, states.shape[-1])
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        norms = x.norm(dim=-1)
        self.norm_sum[layer] = self.norm_sum.get(layer, 0.0) + float(norms.double().sum())
        unit = (x / norms.clamp_min(1e-30)[:, None]).sum(0).double()
        s1, s2 = x.sum(0).double(), (x.T @ x).double()
        if layer in self.first:
            self.unit_sum[layer] += unit
            self.first[layer] += s1
            self.second[layer] += s2
        else:
            self.unit_sum[layer], self.first[layer], self.second[layer] = unit, s1, s2
        if picked is not None:
            self.sample.setdefault(layer, []).append(states.reshape(-1, states.shape[-1])[picked].float().cpu())

    def rows(self) -> list[dict]:
        rows, previous = [], None
        n = self.n
        for layer in sorted(self.first):
            mean_norm = self.norm_sum[layer] / n
            u = self.unit_sum[layer]
            aniso = (float(u @ u) - n) / (n * (n - 1)) if n > 1 else math.nan
            mu = self.first[layer] / n
            cov = (self.second[layer] - n * torch.outer(mu, mu)) / max(n - 1, 1)
            rows.append({"layer": layer, "norm_mean": mean_norm,
                         "norm_growth": mean_norm / previous if previous else math.nan,
                         "anisotropy": aniso, "effective_rank": effective_rank(cov)})
            previous = mean_norm
        return rows

    def samples(self) -> dict[int, torch.Tensor]:
        return {layer: torch.cat(parts) for layer, parts in self.sample.items()}


def effective_rank(cov: torch.Tensor) -> float:
    ev = torch.linalg.eigvalsh(cov.to(torch.float64)).clamp_min(0)
    total = float(ev.sum())
    if total <= 0:
        return math.nan
    p = ev[ev > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


# -- debiased linear CKA ----------------------------------------------------------------------------
def _center(x: torch.Tensor) -> torch.Tensor:
    """Centred features, in float64 when given float64 (else float32; the Gram is upcast after)."""
    x = x if x.dtype == torch.float64 else x.float()
    return x - x.mean(0, keepdim=True)


def _unbiased_centered_gram(x: torch.Tensor) -> torch.Tensor:
    """Gram matrix with the U-statistic centring (Kornblith's ``center_gram(unbiased=True)``)."""
    n = x.shape[0]
    g = (x @ x.T).to(torch.float64)
    g.fill_diagonal_(0)
    means = g.sum(0) / (n - 2)
    means = means - means.sum() / (2 * (n - 1))
    g = g - means[:, None] - means[None, :]
    g.fill_diagonal_(0)
    return g


def _debiased_hsic(cross_sq: Any, rows_dot: Any, rows_x_sum: Any, rows_y_sum: Any, n: int) -> Any:
    """The unbiased HSIC of linear kernels (times n(n − 3), which cancels in CKA), in feature space.

    cross_sq = ‖X̃ᵀỸ‖²_F of the column-centred features; with r_i = ‖x̃_i‖² (the centred Gram's
    diagonal), rows_dot = Σ r_i^x r_i^y and rows_*_sum = Σ r_i. These few numbers are all the estimator
    needs, which is why it can be accumulated over batches (:class:`PairedCKA`)."""
    return cross_sq - n / (n - 2.0) * rows_dot + rows_x_sum * rows_y_sum / ((n - 1) * (n - 2))


def _debiased_dot(xty_sq: torch.Tensor, rows_x: torch.Tensor, rows_y: torch.Tensor, n: int) -> torch.Tensor:
    return _debiased_hsic(xty_sq, rows_x @ rows_y, rows_x.sum(), rows_y.sum(), n)


def _cka_of(hsic_xy: float, hsic_xx: float, hsic_yy: float) -> float:
    denom = math.sqrt(hsic_xx * hsic_yy) if hsic_xx > 0 and hsic_yy > 0 else 0.0
    return hsic_xy / denom if denom > 0 else math.nan


def cka_matrix(xs: list[torch.Tensor], ys: list[torch.Tensor] | None = None, method: str = "auto") -> np.ndarray:
    """Debiased linear CKA between every X in ``xs`` and every Y in ``ys`` (default: ``xs``), each
    (n, d) with the same n ≥ 4 rows (tokens). method: auto, gram or features."""
    same = ys is None
    ys = xs if same else ys
    n = xs[0].shape[0]
    if n < 4:
        raise ValueError("debiased CKA needs at least 4 samples")
    if method == "auto":  # the cheaper in multiply-adds: Grams per layer + pair products, or pair cross-products
        pairs = len(xs) * len(ys) if not same else len(xs) * (len(xs) + 1) // 2
        gram = sum(t.shape[1] for t in (xs if same else xs + ys)) * n * n + pairs * n * n
        feats = pairs * n * max(t.shape[1] for t in xs + ys) ** 2
        method = "gram" if gram <= feats else "features"
    out = np.full((len(xs), len(ys)), np.nan)
    if method == "gram":
        gx = [_unbiased_centered_gram(_center(x)) for x in xs]
        gy = gx if same else [_unbiased_centered_gram(_center(y)) for y in ys]
        nx = [float(g.norm()) for g in gx]
        ny = nx if same else [float(g.norm()) for g in gy]
        for i, a in enumerate(gx):
            for j, b in enumerate(gy):
                if same and j < i:
                    out[i, j] = out[j, i]
                    continue
                out[i, j] = float((a * b).sum()) / (nx[i] * ny[j]) if nx[i] > 0 and ny[j] > 0 else math.nan
        return out
    cx = [_center(x).to(torch.float64) for x in xs]
    cy = cx if same else [_center(y).to(torch.float64) for y in ys]
    rx = [(c * c).sum(1) for c in cx]
    ry = rx if same else [(c * c).sum(1) for c in cy]
    selfx = [float(_debiased_dot((c.T @ c).square().sum(), r, r, n)) for c, r in zip(cx, rx)]
    selfy = selfx if same else [float(_debiased_dot((c.T @ c).square().sum(), r, r, n)) for c, r in zip(cy, ry)]
    for i, a in enumerate(cx):
        for j, b in enumerate(cy):
            if same and j < i:
                out[i, j] = out[j, i]
                continue
            out[i, j] = _cka_of(float(_debiased_dot((a.T @ b).square().sum(), rx[i], ry[j], n)), selfx[i], selfy[j])
    return out


class PairedCKA:
    """Debiased linear CKA between X and Y whose rows are paired (the same tokens through two models),
    accumulated batch by batch, so it covers every token of the data with memory of one batch plus
    three float64 d × d sums.

    The feature-space estimator (:func:`_debiased_hsic`) needs, for each pair (P, Q) of X and Y, the
    centred cross-product P̃ᵀQ̃ and the row norms r_i = ‖p̃_i‖² of the centred rows. Centring uses the
    mean of all rows, known only at the end, so the sums are kept uncentred and centred afterwards:
    P̃ᵀQ̃ = Σ p qᵀ − n μ_p μ_qᵀ, and with a_i = ‖p_i‖², b_i = ‖q_i‖², m = ‖μ‖²,
    Σ r^p r^q = Σ ab − 2 (Σ a q)·μ_q − 2 (Σ b p)·μ_p + 4 μ_pᵀ(Σ p qᵀ)μ_q + m_q Σ a + m_p Σ b − 3 n m_p m_q.
    Rows are shifted by the first batch's mean before summing (CKA does not change under a shift; the
    sums then hold small centred numbers, so the subtractions above do not cancel catastrophically).
    Everything is float64. Tested against :func:`cka_matrix` and a NumPy reference on the whole matrix."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        y = y.reshape(-1, y.shape[-1]).to(torch.float64)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"paired CKA: {x.shape[0]} rows of X vs {y.shape[0]} of Y")
        if not self.n:
            self.shift = (x.mean(0), y.mean(0))
        x, y = x - self.shift[0], y - self.shift[1]
        a, b = (x * x).sum(1), (y * y).sum(1)
        parts = {"sx": x.sum(0), "sy": y.sum(0), "xx": x.T @ x, "yy": y.T @ y, "xy": x.T @ y,
                 "a": a.sum(), "b": b.sum(), "aa": a @ a, "bb": b @ b, "ab": a @ b,
                 "ax": a @ x, "ay": a @ y, "bx": b @ x, "by": b @ y}
        for k, v in parts.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += x.shape[0]

    def _hsic(self, p: str, q: str) -> float:
        s, n = self.sums, self.n
        mu_p, mu_q = s["s" + p] / n, s["s" + q] / n
        m_p, m_q = float(mu_p @ mu_p), float(mu_q @ mu_q)
        a, b = {"x": "a", "y": "b"}[p], {"x": "a", "y": "b"}[q]
        cross = s[p + q] if p + q in s else s[q + p].T
        centred = cross - n * torch.outer(mu_p, mu_q)
        ab = s[a + b] if a + b in s else s[b + a]
        rows_dot = (float(ab) - 2 * float(s[a + q] @ mu_q) - 2 * float(s[b + p] @ mu_p)
                    + 4 * float(mu_p @ cross @ mu_q) + m_q * float(s[a]) + m_p * float(s[b]) - 3 * n * m_p * m_q)
        return float(_debiased_hsic(float(centred.square().sum()), rows_dot, float(s[a]) - n * m_p,
                                    float(s[b]) - n * m_q, n))

    def value(self) -> float:
        """CKA(X, Y) over every row added (NaN when a side is constant)."""
        if self.n < 4:
            raise ValueError("debiased CKA needs at least 4 samples")
        return _cka_of(self._hsic("x", "y"), self._hsic("x", "x"), self._hsic("y", "y"))
