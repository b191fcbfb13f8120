"""Gradient health against closed forms (linear regression), between its two estimators on the
trained nanoGPT, and a planted dead neuron found by a direct computation with nanoGPT's own model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layerscope.probes import Objective, from_module, from_pairs, load_data, load_model
from layerscope.probes.gradients import GradientOptions, gradient_health, mlp_neuron_activity


def test_noise_scale_on_linear_regression_equals_the_closed_form():
    rng = np.random.default_rng(0)
    d, batches, b = 5, 6, 8
    X = rng.standard_normal((batches * b, d))
    w_true = rng.standard_normal(d)
    y = X @ w_true + 0.5 * rng.standard_normal(batches * b)
    w = w_true + 0.3 * rng.standard_normal(d)  # away from the optimum: a real signal
    net = torch.nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor(w).view(1, d))
    model = from_module(net, torch.nn.MSELoss())
    Xt, yt = torch.tensor(X), torch.tensor(y).view(-1, 1)
    data = from_pairs([(Xt[i * b:(i + 1) * b], yt[i * b:(i + 1) * b]) for i in range(batches)])
    result = gradient_health(Objective(model, data), GradientOptions(neurons=False))
    # closed form: ℓ_i = (wᵀx_i − y_i)², g_i = 2 (wᵀx_i − y_i) x_i
    g = 2 * (X @ w - y)[:, None] * X
    n = len(g)
    G = g.mean(0)
    tr = ((g - G) ** 2).sum(1).mean() * n / (n - 1)
    G2 = G @ G - tr / n
    pe = result.noise["per_example"]
    assert pe["trace_sigma"] == pytest.approx(tr, rel=1e-10)
    assert pe["G2"] == pytest.approx(G2, rel=1e-10)
    assert pe["B_simple"] == pytest.approx(tr / G2, rel=1e-10)
    # two batch sizes (b and n), closed form
    Gb2 = np.mean([np.sum(g[i * b:(i + 1) * b].mean(0) ** 2) for i in range(batches)])
    G2_two = (n * (G @ G) - b * Gb2) / (n - b)
    S = (Gb2 - G @ G) / (1 / b - 1 / n)
    assert result.noise["two_batch"]["B_simple"] == pytest.approx(S / G2_two, rel=1e-10)
    row = result.tensors.iloc[0]
    assert row["grad_norm"] == pytest.approx(np.linalg.norm(G), rel=1e-10)
    assert row["grad_to_weight"] == pytest.approx(np.linalg.norm(G) / np.linalg.norm(w), rel=1e-10)
    var = ((g - G) ** 2).mean(0) * n / (n - 1)
    assert row["gsnr"] == pytest.approx(np.mean(G ** 2 / var), rel=1e-8)


def test_estimators_agree_on_the_trained_nanogpt(trained_run, tmp_path):
    from layerscope.store import Store

    model = load_model(trained_run["checkpoints"][-1])
    data = load_data(model, None, seq_len=32, batches=8, batch_size=4, seed=0)
    with Store(tmp_path / "s.sqlite") as store:
        result = gradient_health(Objective(model, data), store=store)
        again = gradient_health(Objective(model, data), store=store)  # from the store
    pe, tb = result.noise["per_example"], result.noise["two_batch"]
    assert math.isfinite(pe["B_simple"]) and pe["B_simple"] > 0 and pe["se"] > 0 and tb["se"] > 0
    # stated rule: the two estimates agree within 3 combined jackknife standard errors
    assert abs(pe["B_simple"] - tb["B_simple"]) <= 3 * math.hypot(pe["se"], tb["se"])
    assert again.noise == result.noise
    groups = result.groups.set_index("group")
    assert groups.loc["model", "share"] == pytest.approx(1.0)
    layered = groups[groups["layer"].notna()]
    assert layered["share"].sum() <= 1.0 and len(layered) == 2
    # the per-tensor gradient norms are those of an independent full backward
    model.module.zero_grad()
    total = sum(Objective(model, data).batch_term(b) for b in range(data.n_batches))
    total.backward()
    for _, row in result.tensors.iterrows():
        assert row["grad_norm"] == pytest.approx(float(model.params[row["name"]].grad.double().norm()), rel=1e-4, abs=1e-9)


def test_planted_dead_neuron_is_found(trained_run):
    from nanogpt_model import GPT, GPTConfig

    ckpt = trained_run["checkpoints"][-1]
    model = load_model(ckpt)
    name = "transformer.h.1.mlp.c_fc.weight"  # GPT-2 Conv1D: (in, out); neuron 7 is column 7
    with torch.no_grad():
        model.params[name][:, 7] = 0.0  # pre-activation 0 on every token: GELU(0) = 0, never > 0
    data = load_data(model, None, seq_len=32, batches=2, batch_size=4, seed=1)
    neurons, tokens = mlp_neuron_activity(Objective(model, data), GradientOptions(threshold=0.0))
    assert tokens == 2 * 4 * 32
    layer1 = neurons.set_index("layer").loc[1]
    assert 7 in layer1["dead_ids"]
    # direct: nanoGPT's own model, the same planted weights, GELU outputs counted by hand
    saved = torch.load(ckpt, weights_only=True)
    ref = GPT(GPTConfig(**saved["model_args"]))
    state = dict(saved["model"])
    state[name] = state[name].clone()
    state[name][7, :] = 0.0  # nn.Linear: (out, in)
    ref.load_state_dict(state)
    ref.eval()
    acts = {}
    hooks = [blk.mlp.c_proj.register_forward_pre_hook(lambda m, i, L=L: acts.setdefault(L, []).append(i[0]))
             for L, blk in enumerate(ref.transformer.h)]
    with torch.no_grad():
        for b in range(2):
            ref(data.input_ids[b])
    for h in hooks:
        h.remove()
    for L in range(2):
        h = torch.cat([a.reshape(-1, a.shape[-1]) for a in acts[L]])
        active = (h > 0).sum(0)
        expected_dead = torch.nonzero(active == 0).flatten().tolist()
        expected_on = torch.nonzero(active == h.shape[0]).flatten().tolist()
        row = neurons.set_index("layer").loc[L]
        assert row["dead_ids"] == expected_dead[:50] and row["dead"] == len(expected_dead)
        assert row["always_on_ids"] == expected_on[:50] and row["always_on"] == len(expected_on)
