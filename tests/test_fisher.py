"""The Fisher probe against independent references: the closed-form Fisher of softmax regression, a
float64 loop of one backward per example, the eigenvalues of the explicit empirical Fisher matrix,
and direct indexing of heads and neurons (GPT-2's transposed Conv1D and Llama's GQA included).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layerscope.errors import LayerscopeError
from layerscope.probes import Objective, from_module, from_pairs, load_data, load_model, probe_key
from layerscope.probes import aggregate
from layerscope.probes import fisher as fisher_mod
from layerscope.probes.fisher import FisherOptions, fisher_diagonal, fisher_probe, gram_spectrum, overlap
from layerscope.probes.per_example import PerExampleGradients
from layerscope.store import Store
from test_probes_base import trained_llama  # noqa: F401  (a module-scoped fixture: a tiny Llama trained 40 steps)


def softmax_regression(n=64, d=5, c=3, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.randint(0, c, (n,))
    net = torch.nn.Linear(d, c).double()
    model = from_module(net, torch.nn.CrossEntropyLoss())
    data = from_pairs([(x[: n // 2], y[: n // 2]), (x[n // 2:], y[n // 2:])])
    return net, model, data, x, y


def closed_form(net, x):
    """Fisher of softmax regression over (W, b): (1/N) Σ_n (diag p_n − p_n p_nᵀ) ⊗ [x_n; 1][x_n; 1]ᵀ,
    i.e. Xᵀ(diag(p) − ppᵀ)X / N for every pair of classes; ordered as W.reshape(-1) then b."""
    with torch.no_grad():
        p = torch.softmax(net(x), -1)
    n, d = x.shape
    c = p.shape[1]
    xa = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    full = torch.zeros(c, d + 1, c, d + 1, dtype=torch.float64)
    for i in range(n):
        cov = torch.diag(p[i]) - torch.outer(p[i], p[i])
        full += torch.einsum("ab,i,j->aibj", cov, xa[i], xa[i]) / n
    full = full.reshape(c * (d + 1), c * (d + 1))
    # reorder (class, [input | bias]) into (W entries, then b entries)
    idx = [a * (d + 1) + i for a in range(c) for i in range(d)] + [a * (d + 1) + d for a in range(c)]
    return full[idx][:, idx]


def test_true_fisher_of_softmax_regression_is_the_closed_form():
    net, model, data, x, _ = softmax_regression()
    obj = Objective(model, data)
    ref = closed_form(net, x)
    # the full matrix: the exact expectation over classes (one vmapped gradient per class) = closed form
    peg = PerExampleGradients(obj)
    full = torch.zeros_like(ref)
    with torch.no_grad():
        probs = torch.softmax(net(x), -1)
    row = 0
    for b in range(obj.n_batches):
        xb, yb = data.batch(b)
        for c in range(3):
            start = row
            for w, g in peg.batch(b, fixed_labels=torch.full_like(yb, c)):
                flat = torch.cat([g["weight"].reshape(len(w), -1), g["bias"]], 1)
                pw = w * probs[start:start + len(w), c]
                full += torch.einsum("n,ni,nj->ij", pw, flat, flat)
                start += len(w)
        row += len(yb)
    torch.testing.assert_close(full, ref, atol=1e-14, rtol=1e-12)
    # the diagonal probe, exact kind: the closed form's diagonal
    exact = fisher_diagonal(obj, FisherOptions(kind="exact", top_k=0))
    diag = torch.cat([exact.values["weight"].reshape(-1), exact.values["bias"]])
    torch.testing.assert_close(diag, torch.diagonal(ref), atol=1e-14, rtol=1e-12)
    # Monte-Carlo true Fisher: 1000 draws per example (64,000 in all) land within 3% (Frobenius) of
    # the closed form (measured 0.7% at this seed); the draws do not depend on how they are grouped
    mc = fisher_diagonal(obj, FisherOptions(kind="true", samples=1000, memory=64 << 20))
    mc_diag = torch.cat([mc.values["weight"].reshape(-1), mc.values["bias"]])
    assert float((mc_diag - torch.diagonal(ref)).norm() / torch.diagonal(ref).norm()) < 0.03
    few = [fisher_diagonal(obj, FisherOptions(kind="true", samples=6, memory=m)) for m in (64 << 20, 4 << 10)]
    for n in ("weight", "bias"):
        torch.testing.assert_close(few[0].values[n], few[1].values[n], atol=1e-15, rtol=1e-13)


def per_example_loop(model, data, names=None, float64=True):
    """The slow reference: one backward per example in float64, F = Σ_i w_i g_i²."""
    obj = Objective(model, data)
    names = names or list(model.params)
    acc = {n: torch.zeros(model.params[n].shape, dtype=torch.float64) for n in names}
    grads_all = []
    for b in range(data.n_batches):
        x, y = data.batch(b)
        w = obj.example_weights(b)
        for i in range(len(w)):
            if obj.token_loss is not None:
                logits = model.module(input_ids=x[i:i + 1]).logits[0]
                mask = y[i] != -100
                loss = torch.nn.functional.cross_entropy(logits[mask], y[i][mask])
            else:
                loss = model.loss_fn(model.module(x[i:i + 1]), y[i:i + 1])
            g = torch.autograd.grad(loss, [model.params[n] for n in names])
            grads_all.append((float(w[i]), [t.detach().double() for t in g]))
            for n, t in zip(names, g):
                acc[n] += float(w[i]) * t.detach().double() ** 2
    return acc, grads_all


def test_empirical_diagonal_equals_a_float64_loop_and_gram_spectrum_the_explicit_matrix():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x, y = torch.randn(24, 4, dtype=torch.float64), torch.randint(0, 3, (24,))
    model = from_module(net, torch.nn.CrossEntropyLoss())
    data = from_pairs([(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])])
    obj = Objective(model, data)
    ref, grads = per_example_loop(model, data)
    got = fisher_diagonal(obj)
    for n in ref:
        torch.testing.assert_close(got.values[n], ref[n], atol=1e-15, rtol=1e-12)
    # the explicit empirical Fisher (P × P, P = 51) and its eigenvalues
    flat = torch.stack([torch.cat([t.reshape(-1) for t in g]) for _, g in grads])
    w = torch.tensor([wi for wi, _ in grads], dtype=torch.float64)
    explicit = torch.einsum("n,ni,nj->ij", w, flat, flat).numpy()
    ev = np.sort(np.linalg.eigvalsh(explicit))[::-1]
    one = gram_spectrum(obj, FisherOptions(top_k=5))
    three = gram_spectrum(obj, FisherOptions(top_k=5, gram_memory=8 * 51 * 8 + 8))  # one batch per block
    assert one.blocks == 1 and three.blocks == 3
    for spec in (one, three):
        np.testing.assert_allclose(spec.top(8), ev[:8], rtol=1e-10, atol=1e-14)
        assert spec.trace == pytest.approx(float(np.trace(explicit)), rel=1e-12)
        assert spec.trace == pytest.approx(got.trace, rel=1e-12)


def test_empirical_diagonal_of_the_trained_gpt_equals_a_float64_loop(trained_run):
    ckpt = trained_run["checkpoints"][-1]
    model = load_model(ckpt)
    data = load_data(model, None, seq_len=32, batches=2, batch_size=3, seed=4)
    got = fisher_diagonal(Objective(model, data), FisherOptions(memory=1 << 20))  # chunks of a few examples
    ref, _ = per_example_loop(load_model(ckpt, dtype="float64"), data)
    for n, r in ref.items():
        scale = float(r.abs().max())
        torch.testing.assert_close(got.values[n].double(), r, atol=1e-5 * scale, rtol=2e-3)
    assert got.trace == pytest.approx(sum(float(r.sum()) for r in ref.values()), rel=1e-4)


def _direct_head_and_neuron_sums(model, values):
    """Heads and neurons by direct indexing, knowing each layout (the reference for the tables)."""
    d = model.anatomy.dims
    hd, nq, nkv = d.head_dim, d.n_heads, d.n_kv_heads
    heads, neurons = {}, {}
    for name, v in values.items():
        layer = model.layer(name)
        v = v.double()
        if name.endswith("attn.c_attn.weight"):  # GPT-2 Conv1D (d, 3d): q|k|v columns
            for h in range(nq):
                for k, off in (("q", 0), ("k", nq * hd), ("v", 2 * nq * hd)):
                    heads[(layer, h, k)] = float(v[:, off + h * hd: off + (h + 1) * hd].sum())
        elif name.endswith("attn.c_proj.weight"):  # Conv1D (d, d): a head's rows feed the output
            for h in range(nq):
                heads[(layer, h, "o")] = float(v[h * hd:(h + 1) * hd].sum())
        elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            k = name.split(".")[-2][0]
            n = nq if k == "q" else nkv
            group = nq // n
            for h in range(nq):
                src = h // group
                heads[(layer, h, k)] = float(v[src * hd:(src + 1) * hd].sum()) / group
        elif name.endswith("o_proj.weight"):
            for h in range(nq):
                heads[(layer, h, "o")] = float(v[:, h * hd:(h + 1) * hd].sum())
        elif name.endswith("mlp.c_fc.weight"):  # Conv1D (d, d_ff): a neuron is a column
            neurons[(layer, "up")] = v.sum(0)
        elif name.endswith("mlp.c_proj.weight"):  # Conv1D (d_ff, d): a neuron is a row
            neurons[(layer, "down")] = v.sum(1)
        elif name.endswith(("up_proj.weight", "gate_proj.weight")):
            neurons[(layer, name.split(".")[-2][:-5])] = v.sum(1)
        elif name.endswith("down_proj.weight"):
            neurons[(layer, "down")] = v.sum(0)
    return heads, neurons


@pytest.mark.parametrize("which", ["nanogpt", "llama"])
def test_head_and_neuron_tables_by_direct_indexing_and_sums(which, trained_run, trained_llama):  # noqa: F811
    path = trained_run["checkpoints"][-1] if which == "nanogpt" else trained_llama
    model = load_model(path)
    data = load_data(model, None, seq_len=24, batches=1, batch_size=4, seed=2)
    values = fisher_diagonal(Objective(model, data)).values
    heads = aggregate.head_table(model, values)
    neurons = aggregate.neuron_table(model, values)
    direct_heads, direct_neurons = _direct_head_and_neuron_sums(model, values)
    for row in heads.itertuples():
        for k in "qkvo":
            assert getattr(row, k) == pytest.approx(direct_heads[(row.layer, row.head, k)], rel=1e-6, abs=1e-12)
    for (layer, part), ref in direct_neurons.items():
        got = neurons[neurons["layer"] == layer][part].to_numpy()
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-6, atol=1e-12)
    # per layer: heads add up to the attention tensors, neurons to the MLP tensors
    tensors = aggregate.tensor_table(model, values)
    for layer in range(model.anatomy.dims.n_layers):
        rows = tensors[tensors["layer"] == layer]
        attn = rows[rows["name"].map(lambda n: bool(model.head_slices(n)))]["fisher"].sum()
        mlp = rows[rows["role"].str.startswith("mlp.")]["fisher"].sum()
        assert heads[heads["layer"] == layer]["fisher"].sum() == pytest.approx(attn, rel=1e-9)
        assert neurons[neurons["layer"] == layer]["fisher"].sum() == pytest.approx(mlp, rel=1e-9)
    layers = aggregate.layer_table(model, values)
    assert layers["fisher"].sum() == pytest.approx(sum(float(v.double().sum()) for v in values.values()), rel=1e-12)
    if which == "llama":  # GQA: query heads 2h and 2h+1 share key/value head h
        assert list(heads[heads["layer"] == 0]["kv_head"]) == [0, 0, 1, 1]


def test_head_sums_cover_every_fused_layout(arch_checkpoints):
    """Every attention entry is credited once (gpt_neox interleaved qkv with bias, phi3 fused qkv and
    gate_up, qwen2 q/k/v biases): sums over heads and neurons are the attention and MLP totals."""
    gen = torch.Generator().manual_seed(0)
    for arch in ("gpt2", "gpt_neox", "phi3", "qwen2"):
        model = load_model(arch_checkpoints[arch])
        values = {n: torch.rand(p.shape, generator=gen, dtype=torch.float64) for n, p in model.params.items()}
        heads = aggregate.head_table(model, values)
        neurons = aggregate.neuron_table(model, values)
        attn = sum(float(v.sum()) for n, v in values.items() if model.head_slices(n))
        assert heads["fisher"].sum() == pytest.approx(attn, rel=1e-12), arch
        mlp = sum(float(v.sum()) for n, v in values.items() if aggregate.neuron_axis(model, n, tuple(v.shape)))
        assert neurons["fisher"].sum() == pytest.approx(mlp, rel=1e-12), arch
        assert len(neurons) == model.anatomy.dims.n_layers * model.anatomy.dims.d_ff, arch


def test_overlap_is_the_stated_formula():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.rand(1000, generator=gen, dtype=torch.float64), torch.rand(1000, generator=gen, dtype=torch.float64) ** 4
    same = overlap(a, 7.0 * a)  # unit-trace normalisation: scale does not matter
    assert same["overlap"] == pytest.approx(1.0, abs=1e-12) and same["top_shared"] == 1.0
    disjoint = overlap(torch.cat([a[:500], torch.zeros(500, dtype=torch.float64)]),
                       torch.cat([torch.zeros(500, dtype=torch.float64), a[500:]]))
    assert disjoint["overlap"] == pytest.approx(0.0, abs=1e-12) and disjoint["top_shared"] == 0.0
    an, bn = a.numpy() / a.sum().item(), b.numpy() / b.sum().item()
    assert overlap(a, b)["overlap"] == pytest.approx(1 - 0.5 * np.sum((np.sqrt(an) - np.sqrt(bn)) ** 2), rel=1e-12)
    assert overlap(a, b)["overlap"] == pytest.approx(np.sum(np.sqrt(an * bn)), rel=1e-12)  # the Bhattacharyya coefficient
    top_a, top_b = set(np.argsort(-an)[:10]), set(np.argsort(-bn)[:10])
    assert overlap(a, b)["top_shared"] == len(top_a & top_b) / 10


def test_fisher_is_stored_and_resumes_after_ctrl_c(tmp_path, monkeypatch):
    _, model, data, _, _ = softmax_regression(n=48)
    data = from_pairs([data.batch(0), data.batch(1), (data.batch(1)[0][:5], data.batch(1)[1][:5])])
    obj = Objective(model, data)
    options = FisherOptions(kind="true", samples=2, top_k=0, memory=4 << 10)
    clean = fisher_diagonal(obj, options)
    monkeypatch.setattr(fisher_mod, "SAVE_EVERY", 0.0)
    seen = []

    def interrupt(name, done, total):
        seen.append(done)
        if len(seen) == 3:
            raise KeyboardInterrupt

    key = probe_key(model, data)
    with Store(tmp_path / "s.sqlite") as store:
        with pytest.raises(KeyboardInterrupt):
            fisher_diagonal(obj, options, store=store, key=key, progress=interrupt)
        seen.clear()
        resumed = fisher_diagonal(obj, options, store=store, key=key, progress=lambda *a: seen.append(a[1]))
        assert seen[0] > 0  # it started where the interrupted run stopped
        again = fisher_diagonal(obj, options, store=store, key=key)
    assert again.rows is None and resumed.rows is not None  # the third call computed nothing
    for n in clean.values:
        torch.testing.assert_close(resumed.values[n], clean.values[n], atol=1e-15, rtol=1e-12)
        torch.testing.assert_close(again.values[n], clean.values[n], atol=1e-15, rtol=1e-12)


def test_trained_llama_fisher_probe_and_bad_options(trained_llama):  # noqa: F811
    model = load_model(trained_llama)
    data = load_data(model, None, seq_len=24, batches=2, batch_size=3, seed=1)
    obj = Objective(model, data)
    result = fisher_probe(obj, FisherOptions(top_k=4))
    s = result.summary()
    assert s["examples"] == 6 and s["parameters"] == model.parameter_count
    ev = s["top_eigenvalues"]
    assert len(ev) == 4 and all(x >= y for x, y in zip(ev, ev[1:])) and ev[-1] > 0
    assert s["empirical_trace"] == pytest.approx(s["trace"], rel=1e-4)  # tr F from the Gram = Σ diagonal
    assert result.tensors["fisher"].sum() == pytest.approx(s["trace"], rel=1e-9)
    true = fisher_probe(obj, FisherOptions(kind="true", samples=3, top_k=0))
    assert true.kind == "true" and true.trace > 0 and true.spectrum is None
    assert true.trace != pytest.approx(s["trace"], rel=1e-3)  # sampled targets are not the data's
    with pytest.raises(LayerscopeError, match="--fisher-kind"):
        FisherOptions(kind="fake")
    with pytest.raises(LayerscopeError, match="exact Fisher"):
        fisher_diagonal(obj, FisherOptions(kind="exact"))
    mse = from_module(torch.nn.Linear(3, 2), torch.nn.MSELoss())
    with pytest.raises(LayerscopeError, match="categorical"):
        fisher_diagonal(Objective(mse, from_pairs((torch.randn(4, 3), torch.randn(4, 2)))), FisherOptions(kind="true"))
    assert math.isfinite(s["trace"])
