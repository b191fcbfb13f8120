"""Findings against nulls: the Marchenko–Pastur law against float64 references, Gaussian and planted
matrices, and whole checkpoints (real transformers configs, Gaussian weights) through the report."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import integrate

import layerscope
from layerscope.config import Config
from layerscope.report import depth
from layerscope.report.findings import matrix_findings, model_findings
from layerscope.weights.heads import categorise
from layerscope.weights.metrics.mp import fit_mp, is_random_like, ks_critical, mp_cdf, mp_median, tracy_widom_threshold


# -- the law itself ------------------------------------------------------------------------------
@pytest.mark.parametrize("y", [1.0, 0.6, 0.25, 0.05])
def test_mp_cdf_and_median_match_float64_quadrature(y):
    a, b = (1 - math.sqrt(y)) ** 2, (1 + math.sqrt(y)) ** 2
    density = lambda x: math.sqrt(max((b - x) * (x - a), 0.0)) / (2 * math.pi * y * x)  # noqa: E731
    xs = np.linspace(a, b, 9)[1:-1]
    ref = np.array([integrate.quad(density, a, x, limit=200)[0] for x in xs])
    np.testing.assert_allclose(mp_cdf(xs, y), ref, atol=1e-6)
    assert mp_cdf(np.array([a - 1.0, b + 1.0]), y).tolist() == [0.0, 1.0]
    med = mp_median(y)
    assert integrate.quad(density, a, med, limit=200)[0] == pytest.approx(0.5, abs=1e-6)


def test_edge_and_tracy_widom_threshold_closed_forms():
    rng = np.random.default_rng(1)
    n, m, sigma = 300, 100, 0.5
    w = rng.normal(0, sigma, (n, m))
    fit = fit_mp(np.linalg.svd(w, compute_uv=False) ** 2, (n, m))
    assert fit.sigma2 == pytest.approx(sigma**2, rel=0.05)  # median match: unbiased, sd 1.4 % at this shape
    assert fit.edge == pytest.approx(fit.sigma2 * (math.sqrt(n) + math.sqrt(m)) ** 2, rel=1e-12)
    root = math.sqrt(n - 1) + math.sqrt(m)  # Johnstone (2001), real case
    assert tracy_widom_threshold(n, m, 4.0) == pytest.approx(root**2 + 4 * root * (1 / math.sqrt(n - 1) + 1 / math.sqrt(m)) ** (1 / 3))


@pytest.mark.parametrize("shape", [(64, 64), (256, 64), (64, 384), (384, 384), (1536, 384)])
def test_gaussian_matrices_are_random_like(shape):
    """Rule: no spike, KS ≤ 1.36/√M. 8 seeded draws per shape, any entry scale."""
    rng = np.random.default_rng(sum(shape))
    for scale in (0.02, 1.0, 30.0, 3.0, 0.5, 0.1, 2.0, 7.0):
        w = rng.normal(0, scale, shape)
        fit = fit_mp(np.linalg.svd(w, compute_uv=False) ** 2, shape)
        assert fit.spikes == 0, (shape, scale)
        assert fit.ks <= ks_critical(min(shape)) / 1.5, (shape, scale, fit.ks)  # well inside the rule
        assert is_random_like(fit.spikes, fit.ks, min(shape))


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_planted_spikes_are_counted(rank):
    """W = G + Σ θ_i u_i v_iᵀ with θ_i above the BBP threshold σ(NM)^{1/4} gives exactly ``rank`` spikes."""
    rng = np.random.default_rng(rank)
    n, m = 400, 200
    u = np.linalg.qr(rng.normal(size=(n, rank)))[0]
    v = np.linalg.qr(rng.normal(size=(m, rank)))[0]
    theta = np.linspace(2.0, 4.0, rank) * (n * m) ** 0.25
    w = rng.normal(size=(n, m)) + u @ np.diag(theta) @ v.T
    fit = fit_mp(np.linalg.svd(w, compute_uv=False) ** 2, (n, m))
    assert fit.spikes == rank and not is_random_like(fit.spikes, fit.ks, m)


def test_mp_metrics_in_the_pipeline_equal_a_float64_fit(tmp_path):
    path = _llama(tmp_path / "m", seed=3)
    table = layerscope.analyze(path, metrics="mp_sigma,mp_edge,mp_spikes,mp_ks,mp_softrank,spectral_norm",
                               store=str(tmp_path / "s.sqlite")).table
    from layerscope.sources import open_source

    src = open_source(path)
    for row in table[table["shape"].str.contains("×")].head(6).itertuples():
        w = src.load(row.name).double().numpy()
        s = np.linalg.svd(w, compute_uv=False)
        fit = fit_mp(s**2, w.shape)
        assert row.mp_spikes == fit.spikes and row.mp_ks == pytest.approx(fit.ks, abs=1e-9)
        assert row.mp_sigma == pytest.approx(math.sqrt(fit.sigma2), rel=1e-9)
        assert row.mp_edge == pytest.approx(math.sqrt(fit.sigma2) * (math.sqrt(max(w.shape)) + math.sqrt(min(w.shape))), rel=1e-9)
        assert row.mp_softrank == pytest.approx(fit.edge / s[0] ** 2, rel=1e-9)


# -- the peer test's floor -----------------------------------------------------------------------
def test_identical_layers_never_give_infinite_or_nan_scores():
    assert depth.robust_z(np.array([2.0, 2.0])).tolist() == [0.0, 0.0]
    assert depth.robust_z(np.zeros(5)).tolist() == [0.0] * 5
    z = depth.robust_z(np.array([3.0, 3.0, 3.0, 3.0, 3.3]))
    assert np.isfinite(z).all() and z[-1] == pytest.approx(0.3 / (0.05 * 3.06))
    z = depth.robust_z(np.array([0.0, 0.0, 0.0, 0.0, 1e-9]))
    assert np.isfinite(z).all()
    rows = [{"name": f"l.{i}.v", "layer": i, "role": "attn.v", "shape": "8×8", "entropy_rank": 5.0, "error": ""}
            for i in range(6)]
    rows[5]["entropy_rank"] = 5.0 + 1e-12
    found = depth.outliers(pd.DataFrame(rows), {"entropy_rank": ""})
    assert found.empty


# -- whole checkpoints ---------------------------------------------------------------------------
LAYERS = 6


def _llama(directory, seed: int = 0, plant=None, copy_layer: bool = False):
    """A real LlamaConfig (6 layers, d_model 64, GQA 4/2 heads), every matrix Gaussian as transformers
    initialises it (std 0.02). ``plant(state)`` edits the state dict before saving."""
    import transformers as tf

    import checkpoints

    config = checkpoints.tiny_config("llama")
    config.num_hidden_layers = LAYERS
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if copy_layer:  # two identical layers
        for k in list(state):
            if k.startswith("model.layers.1."):
                state[k] = state[k.replace("layers.1.", "layers.0.")].clone()
    if plant:
        plant(state)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    checkpoints.save_safetensors(state, directory / "model.safetensors")
    return directory


def _report_findings(path, tmp_path):
    from layerscope.report.build import _findings, collect

    config = Config(store=str(tmp_path / "store.sqlite"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no warning may leak
        data = collect(path, config, embeddings=False, clusters=False)
        context, found = _findings([data])
    return data, found


def test_random_checkpoint_yields_no_findings(tmp_path):
    path = _llama(tmp_path / "random", copy_layer=True)
    data, found = _report_findings(path, tmp_path)
    assert found == [], found
    outl = depth.outliers(data.table)
    assert outl.empty or np.isfinite(outl["robust z"]).all()
    assert not data.heads.categories.low_rank and not data.heads.categories.copying


def test_planted_low_rank_layer_is_exactly_the_finding(tmp_path):
    name = "model.layers.3.mlp.down_proj.weight"

    def plant(state):
        w = state[name]
        g = torch.Generator().manual_seed(7)
        low = torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
        state[name] = low * (w.norm() / low.norm())  # rank 2, same Frobenius norm

    path = _llama(tmp_path / "planted", plant=plant)
    data, found = _report_findings(path, tmp_path)
    assert len(found) == 1 and name in found[0] and "low-rank" in found[0], found
    (finding,) = model_findings(data.table)
    assert finding.subject == name and math.isfinite(finding.score)


def test_planted_low_rank_head_is_categorised(tmp_path):
    def plant(state):  # head 1 of layer 2: W_Q block of rank 2
        q = state["model.layers.2.self_attn.q_proj.weight"]
        hd = 16
        g = torch.Generator().manual_seed(5)
        block = torch.randn(hd, 2, generator=g) @ torch.randn(2, q.shape[1], generator=g)
        q[hd:2 * hd] = block * (q[hd:2 * hd].norm() / block.norm())

    path = _llama(tmp_path / "head", plant=plant)
    result = layerscope.heads(path, store=str(tmp_path / "s.sqlite"))
    cats = result.categories
    assert cats.low_rank == [(2, 1)] and not cats.high_rank
    # the null is the same metric on random heads: recompute it directly in float64 NumPy
    rng = np.random.default_rng(0)
    ranks = []
    for _ in range(32):
        a = rng.normal(size=(16, 64)).T @ rng.normal(size=(16, 64))
        s = np.linalg.svd(a, compute_uv=False)[:16]
        p = s / s.sum()
        ranks.append(math.exp(-(p * np.log(p)).sum()))
    assert cats.null.qk_entropy_rank[0] == pytest.approx(np.mean(ranks), rel=0.01)
    again = categorise(result.table, 16, 64)
    assert again.low_rank == cats.low_rank


def test_matrix_findings_need_the_random_matrix_test(tmp_path):
    """A peer outlier whose own spectrum is random-like is not a finding."""
    rows = [{"name": f"l.{i}.v", "layer": i, "role": "attn.v", "shape": "64×64", "entropy_rank": 40.0 + 0.1 * i,
             "mp_spikes": 0, "mp_ks": 0.01, "error": ""} for i in range(6)]
    rows[2]["entropy_rank"] = 20.0
    table = pd.DataFrame(rows)
    assert len(depth.outliers(table, {"entropy_rank": ""})) == 1
    assert matrix_findings(table) == []
    rows[2]["mp_spikes"] = 5
    (finding,) = matrix_findings(pd.DataFrame(rows))
    assert finding.subject == "l.2.v" and "low-rank" in finding.text
