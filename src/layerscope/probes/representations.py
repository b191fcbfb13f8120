"""Geometry of the hidden states, layer by layer, and how similar layers are (debiased linear CKA).

Per layer (0 = the embeddings' output, l = the output of block l), over every token state h of the data:

* ``norm_mean``: mean ‖h‖; ``norm_growth``: its ratio to the previous layer's.
* ``anisotropy``: mean cosine over all pairs of distinct token states, exactly, from the running sum
  of unit vectors: (‖Σ u‖² − n) / (n(n − 1)). 0 for isotropic states, near 1 when all share a direction.
* ``effective_rank``: exp of the entropy of the normalised eigenvalues of the state covariance
  (Roy & Vetterli 2007), from each batch's mean and scatter about it, merged across batches in
  float64 (Chan et al.'s update), with the eigenvalues taken once per run.

CKA: debiased linear CKA (Nguyen, Raghu & Kornblith 2021: the unbiased HSIC estimator of Song et al.
2012 in place of the biased one) between every pair of layers, on the states of a seeded sample of
token positions (the same positions in every layer; ``cka_tokens`` of them spread over the batches),
computed with float32 products and float64 reductions (see ``cka_matrix``). With n sampled tokens
and width d it uses n × n Gram matrices when n < d and d × d cross-products otherwise (Kornblith's
feature-space form), whichever is cheaper; both are tested against a NumPy float64 reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .workspace import Workspace


STACK_ELEMENTS = 1 << 20  # states (all layers of one width) up to which the layers are stacked


@dataclass
class _Sums:
    """Running float64 sums for a run of consecutive layers of one width, stacked: (layers, …)."""

    layers: list[int]
    norm_sum: torch.Tensor
    unit_sum: torch.Tensor  # (layers, d)
    mean: torch.Tensor  # (layers, d)
    scatter: torch.Tensor  # (layers, d, d): Σ (h − mean)(h − mean)ᵀ


@dataclass
class RepresentationAccumulator:
    """Running sums over every token state of every layer: O(layers × d²) memory."""

    n: int = 0
    groups: list[_Sums] = field(default_factory=list)
    sample: list[list[torch.Tensor]] = field(default_factory=list)  # per batch: per group (layers, picked, d)
    ws: Workspace = field(default_factory=Workspace, repr=False)

    def add_layers(self, states: list[torch.Tensor], picked: torch.Tensor | None) -> None:
        """One batch: ``states`` one (B, S, d) per layer (0 = embeddings). The batch's sums are taken
        in the states' precision (float32: pairwise-summed reductions, and one batched matmul for the
        scatter about the batch's own mean, relative error ~1e-7 of the covariance however large the
        states' common mean) and merged across batches in float64 (Chan et al.'s pairwise update of
        mean and scatter). Small layers of one width are stacked, so the cost is a handful of batched
        operations whatever the depth; large ones go layer by layer (no stacking copy)."""
        if not self.groups:
            spans: list[list[int]] = []
            for i, s in enumerate(states):
                if spans and states[spans[-1][-1]].shape[-1] == s.shape[-1]:
                    spans[-1].append(i)
                else:
                    spans.append([i])
        else:
            spans = [g.layers for g in self.groups]
        n_a, n_b = self.n, states[0].shape[:-1].numel()
        self.n += n_b
        batch_sample = []
        for gi, layers in enumerate(spans):
            parts = [states[i].reshape(-1, states[i].shape[-1]) for i in layers]
            parts = [p.float() if p.dtype in (torch.float16, torch.bfloat16) else p for p in parts]
            if sum(p.numel() for p in parts) <= STACK_ELEMENTS:  # small: one batched call for all layers
                shape = (len(layers), *parts[0].shape)
                x = torch.stack(parts, out=self.ws(f"stack{gi}", shape, parts[0].dtype, parts[0].device))  # (L, N, d)
                sums = self._sums(x, f"unit{gi}")
            else:  # large: layer by layer (the stacking copy would cost more than the calls it saves)
                x = None
                sums = tuple(torch.cat(v) for v in zip(*(self._sums(p[None], "unit") for p in parts)))
            norm_sum, unit_sum, mean, scatter = sums
            if gi < len(self.groups):
                g = self.groups[gi]
                g.norm_sum += norm_sum
                g.unit_sum += unit_sum
                delta = mean - g.mean
                g.scatter += scatter + (n_a * n_b / (n_a + n_b)) * delta[:, :, None] * delta[:, None, :]
                g.mean += delta * (n_b / (n_a + n_b))
            else:
                self.groups.append(_Sums(layers, *sums))
            if picked is not None:
                batch_sample.append(x[:, picked].float().cpu() if x is not None else
                                    torch.stack([p[picked].float().cpu() for p in parts]))
        if picked is not None:
            self.sample.append(batch_sample)

    def _sums(self, x: torch.Tensor, buffer: str) -> tuple[torch.Tensor, ...]:
        """(L, N, d) float states -> Σ‖h‖ (L,), Σ h/‖h‖ (L, d), the mean (L, d) and the scatter about
        it Σ (h − mean)(h − mean)ᵀ (L, d, d), float64. The scatter is taken about the float32 mean m
        and corrected exactly: Σ (h − μ)(h − μ)ᵀ = Σ (h − m)(h − m)ᵀ − N (μ − m)(μ − m)ᵀ."""
        n = x.shape[1]
        norms = x.norm(dim=-1)  # (L, N)
        work = self.ws(buffer, x.shape, x.dtype, x.device)
        unit_sum = torch.div(x, norms.clamp_min(1e-30)[..., None], out=work).sum(1).double()
        m = x.mean(1, keepdim=True)
        xc = torch.sub(x, m, out=work)
        shift = xc.sum(1).double() / n  # μ − m
        scatter = torch.bmm(xc.transpose(1, 2), xc).double() - n * shift[:, :, None] * shift[:, None, :]
        return norms.double().sum(-1), unit_sum, m.squeeze(1).double() + shift, scatter

    def rows(self) -> list[dict]:
        """Per-layer rows; the covariance eigenvalues of a group's layers in one batched call, once per run."""
        n = self.n
        by_layer = {}
        for g in self.groups:
            cov = g.scatter / max(n - 1, 1)
            ranks = effective_ranks(cov)
            aniso = ((g.unit_sum * g.unit_sum).sum(-1) - n) / (n * (n - 1)) if n > 1 else None
            for k, layer in enumerate(g.layers):
                by_layer[layer] = (float(g.norm_sum[k]) / n, float(aniso[k]) if aniso is not None else math.nan, ranks[k])
        rows, previous = [], None
        for layer in sorted(by_layer):
            mean_norm, aniso, rank = by_layer[layer]
            rows.append({"layer": layer, "norm_mean": mean_norm,
                         "norm_growth": mean_norm / previous if previous else math.nan,
                         "anisotropy": aniso, "effective_rank": rank})
            previous = mean_norm
        return rows

    def samples(self) -> dict[int, torch.Tensor]:
        """layer -> (sampled tokens, d) float32: the CKA sample, the same token positions in every layer."""
        out = {}
        for gi, g in enumerate(self.groups):
            parts = [batch[gi] for batch in self.sample]
            if parts:
                x = torch.cat(parts, dim=1)
                out.update({layer: x[k] for k, layer in enumerate(g.layers)})
        return out


def effective_ranks(cov: torch.Tensor) -> list[float]:
    """exp(entropy of the normalised eigenvalues) of each (…, d, d) covariance, float64."""
    ev = torch.linalg.eigvalsh(cov.to(torch.float64)).clamp_min(0)
    total = ev.sum(-1, keepdim=True)
    p = ev / total.clamp_min(1e-300)
    h = -torch.special.xlogy(p, p).sum(-1)
    return [float(torch.exp(v)) if float(t) > 0 else math.nan for v, t in zip(h, total[..., 0])]


def effective_rank(cov: torch.Tensor) -> float:
    return effective_ranks(cov[None])[0]


# -- debiased linear CKA ----------------------------------------------------------------------------
def _center(x: torch.Tensor) -> torch.Tensor:
    """Centred features, in float64 when given float64 (else float32; the Gram is upcast after)."""
    x = x if x.dtype == torch.float64 else x.float()
    return x - x.mean(0, keepdim=True)


def _unbiased_centered_grams(xs: list[torch.Tensor]) -> torch.Tensor:
    """(k, n, n) float64 Gram matrices with the U-statistic centring (Kornblith's
    ``center_gram(unbiased=True)``), every layer's at once. Each Gram is one matmul in the features'
    precision (float32 for float32 states: the diagonal, the largest terms, is zeroed exactly, so
    the relative error of the off-diagonal entries stays ~1e-7); the centring is float64."""
    n = xs[0].shape[0]
    g = torch.stack([(x @ x.T).to(torch.float64) for x in xs])
    g.diagonal(dim1=-2, dim2=-1).zero_()
    means = g.sum(-2) / (n - 2)  # (k, n)
    means = means - means.sum(-1, keepdim=True) / (2 * (n - 1))
    g -= means[:, :, None]
    g -= means[:, None, :]
    g.diagonal(dim1=-2, dim2=-1).zero_()
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
    (n, d) with the same n ≥ 4 rows (tokens). method: auto, gram or features.

    Precision: float64 inputs are computed in float64 throughout. float32 inputs (the probe's
    sampled states) are centred and multiplied in float32 and every reduction after the matmuls
    (centring of the Grams, the HSIC sums, the norms) is float64: CKA to ~1e-6 (tested)."""
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
    if method == "gram":
        gx = _unbiased_centered_grams([_center(x) for x in xs]).flatten(1)
        gy = gx if same else _unbiased_centered_grams([_center(y) for y in ys]).flatten(1)
        dots = (gx @ gy.T).numpy(force=True)  # every pair's HSIC numerator in one float64 matmul
        nx = np.sqrt(np.diag(dots)) if same else gx.norm(dim=1).numpy(force=True)
        ny = nx if same else gy.norm(dim=1).numpy(force=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = dots / np.outer(nx, ny)
        out[(nx[:, None] <= 0) | (ny[None, :] <= 0)] = math.nan
        return out
    out = np.full((len(xs), len(ys)), np.nan)
    cx = [_center(x) for x in xs]
    cy = cx if same else [_center(y) for y in ys]
    rx = [(c * c).sum(1, dtype=torch.float64) for c in cx]
    ry = rx if same else [(c * c).sum(1, dtype=torch.float64) for c in cy]

    def xty_sq(a, b):  # ‖aᵀb‖²_F: the product in the features' precision, the sum of squares in float64
        p = a.T @ b
        return (p * p).sum(dtype=torch.float64)

    selfx = [float(_debiased_dot(xty_sq(c, c), r, r, n)) for c, r in zip(cx, rx)]
    selfy = selfx if same else [float(_debiased_dot(xty_sq(c, c), r, r, n)) for c, r in zip(cy, ry)]
    for i, a in enumerate(cx):
        for j, b in enumerate(cy):
            if same and j < i:
                out[i, j] = out[j, i]
                continue
            hsic = selfx[i] if same and i == j else float(_debiased_dot(xty_sq(a, b), rx[i], ry[j], n))
            out[i, j] = _cka_of(hsic, selfx[i], selfy[j])
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
