"""The Hessian probe against the exact float64 Hessian of a model small enough to form it.

Reference: ``torch.autograd.functional.hessian`` of the same loss (a separate code path: the
functional form over a flat parameter vector), diagonalised by ``numpy.linalg.eigvalsh``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from layerscope.probes import Objective, from_module, from_pairs
from layerscope.probes.curvature import HessianOptions, block_groups, hessian_probe
from layerscope.probes.hessian import HessianOperator


class Block(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, name, nn.Linear(d, d, bias=False))
        self.mlp = nn.Module()
        self.mlp.up_proj, self.mlp.down_proj = nn.Linear(d, f), nn.Linear(f, d)
        self.input_layernorm = nn.LayerNorm(d)

    def forward(self, x):
        h = self.input_layernorm(x)
        a = self.self_attn
        q, k, v = a.q_proj(h), a.k_proj(h), a.v_proj(h)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        att = torch.softmax((q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~mask, -1e9), -1)
        x = x + a.o_proj(att @ v)
        return x + self.mlp.down_proj(torch.tanh(self.mlp.up_proj(x)))


class TinyLM(nn.Module):
    """A two-layer causal transformer of 1,264 parameters with Llama-style names (so the anatomy knows them)."""

    def __init__(self, vocab: int = 10, d: int = 8, f: int = 16, n: int = 2):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d, f) for _ in range(n)])
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for b in self.layers:
            x = b(x)
        return self.lm_head(x)


def token_ce(logits, y):
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@pytest.fixture(scope="module")
def exact():
    """The tiny LM, its objective on two batches, and the exact Hessian's eigenvalues (and blocks)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = TinyLM().double()
    model = from_module(net, token_ce)
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(0, 10, (3, 6), generator=g), torch.randint(0, 10, (3, 6), generator=g)) for _ in range(2)]
    obj = Objective(model, from_pairs(pairs))
    names = list(model.params)
    shapes = [model.params[n].shape for n in names]
    sizes = [model.params[n].numel() for n in names]

    def f(theta):
        return obj.functional_loss({n: p.view(s) for n, p, s in zip(names, theta.split(sizes), shapes)})

    theta = torch.cat([model.params[n].detach().reshape(-1) for n in names])
    H = torch.autograd.functional.hessian(f, theta, vectorize=True).numpy()
    offsets = np.cumsum([0] + sizes)
    where = {n: np.arange(offsets[i], offsets[i + 1]) for i, n in enumerate(names)}
    yield {"model": model, "objective": obj, "H": H, "eig": np.linalg.eigvalsh(H), "where": where}
    torch.set_num_threads(threads)


def test_hvp_is_the_exact_hessian_times_v(exact):
    op = HessianOperator(exact["objective"])
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(op.matvec_tensor(v).numpy(), exact["H"] @ v.numpy(), rtol=1e-9, atol=1e-12)
    assert op.hvps == 1


def test_eigenvalues_trace_density_and_blocks_against_exact(exact, tmp_path):
    from layerscope.store import Store

    options = HessianOptions(top_k=5, tol=1e-9, max_iter=200, trace_min=40, trace_max=40, trace_rel_error=None,
                             density_runs=4, density_steps=40, blocks=("layer",), block_tol=1e-9, block_max_iter=200)
    store = Store(tmp_path / "s.sqlite")
    result = hessian_probe(exact["objective"], options, store=store, key="w:d")
    eig = exact["eig"]
    assert result.eigen_info["converged"] and result.parameters == exact["H"].shape[0]
    # top-k and bottom within 1e-6 relative; residuals are honest bounds
    np.testing.assert_allclose(result.eigenvalues["eigenvalue"], eig[::-1][:5], rtol=1e-6)
    assert np.all(np.abs(result.eigenvalues["eigenvalue"].to_numpy() - eig[::-1][:5])
                  <= result.eigenvalues["residual"].to_numpy() + 1e-9 * eig[-1])
    assert result.bottom["eigenvalue"] == pytest.approx(eig[0], rel=1e-6)
    assert eig[0] < 0 and not result.is_minimum  # random weights: a saddle, and the probe says so
    # trace within 3 standard errors
    tr = result.trace
    assert abs(tr.estimate - np.trace(exact["H"])) <= 3 * tr.std_error
    # blocks: top eigenvalue of the exact block; trace within 3 standard errors of the exact block's
    groups = block_groups(exact["model"], ("layer",))
    assert len(result.blocks) == len(groups) == 3
    for row, ((kind, block), names) in zip(result.blocks.itertuples(), groups.items()):
        idx = np.concatenate([exact["where"][n] for n in names])
        sub = exact["H"][np.ix_(idx, idx)]
        sub_eig = np.linalg.eigvalsh(sub)
        assert row.block == block and row.parameters == len(idx)
        assert row.top_eigenvalue == pytest.approx(sub_eig[-1], rel=1e-6)
        assert row.min_eigenvalue == pytest.approx(sub_eig[0], rel=1e-6, abs=1e-9)
        assert abs(row.trace - np.trace(sub)) <= 3 * row.trace_std_error
    # density: against the exact eigenvalues' CDF F. Rule: Wasserstein-1 distance ∫|F̂ − F| below 2% of
    # the spectral range, and the Kolmogorov distance of both CDFs smoothed by a Gaussian of 5% of the
    # range below 0.01 (4 runs × 40 steps). Unsmoothed Kolmogorov distance is not a fair test: a
    # Hessian's large cluster near 0 is one jump of F that m quadrature nodes can only straddle.
    from scipy.stats import norm

    span = eig[-1] - eig[0]
    grid = np.linspace(eig[0] - 0.2 * span, eig[-1] + 0.2 * span, 2001)
    exact_cdf = np.searchsorted(eig, grid, side="right") / len(eig)
    est = result.density.cdf(grid)
    w1 = np.trapezoid(np.abs(est - exact_cdf), grid) / span
    sigma = 0.05 * span
    smooth_exact = norm.cdf((grid[:, None] - eig[None, :]) / sigma).mean(axis=1)
    smooth_est = np.mean([(w[None, :] * norm.cdf((grid[:, None] - t[None, :]) / sigma)).sum(axis=1)
                          for t, w in zip(result.density.nodes, result.density.weights)], axis=0)
    ks = np.max(np.abs(smooth_est - smooth_exact))
    print(f"density: W1/range {w1:.4f}, smoothed Kolmogorov {ks:.4f}")
    assert w1 < 0.02 and ks < 0.01, (w1, ks)
    json.dumps(result.to_dict())  # serialisable

    # a re-run reads every part from the store: no Hessian-vector product at all
    again = hessian_probe(exact["objective"], options, store=store, key="w:d")
    assert again.hvps == 0
    np.testing.assert_allclose(again.eigenvalues["eigenvalue"], result.eigenvalues["eigenvalue"])
    assert again.trace.estimate == result.trace.estimate


def test_type_blocks_cover_every_parameter_once(exact):
    groups = block_groups(exact["model"], ("type",))
    names = [n for ns in groups.values() for n in ns]
    assert sorted(names) == sorted(exact["model"].params)
    assert {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down", "norm", "embed.token", "lm_head"} <= {b for _, b in groups}
