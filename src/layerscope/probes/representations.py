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


def _debiased_dot(xty_sq: torch.Tensor, rows_x: torch.Tensor, rows_y: torch.Tensor, n: int) -> torch.Tensor:
    sx, sy = rows_x.sum(), rows_y.sum()
    return xty_sq - n / (n - 2.0) * (rows_x @ rows_y) + sx * sy / ((n - 1) * (n - 2))


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
            denom = math.sqrt(selfx[i] * selfy[j]) if selfx[i] > 0 and selfy[j] > 0 else 0.0
            out[i, j] = hsic / denom if denom > 0 else math.nan
    return out
