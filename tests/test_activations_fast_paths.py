"""The activations probe's fast paths against the slow direct method they replace, in float64 where
there is one: the block-maxima top-k and the packed-key max rounds (torch.topk), the lazily merged
running top-k and the float32-sign counts over several batches (a direct top-k and count over all the
data), the stacked and the layer-by-layer geometry sums (each other and float64 NumPy), CKA of float32
states (Kornblith's float64 NumPy code), and every logit-lens column at every layer (a float64
recomputation from the hooked states through the model's own final norm and head).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerscope.probes import head_behaviour, neurons, representations
from layerscope.probes.neurons import NeuronAccumulator, top_rows, topk_rows
from layerscope.probes.representations import RepresentationAccumulator, cka_matrix
from reference import kornblith_cka




@pytest.mark.parametrize("n", [3, 40, 203, 512])
def test_top_rows_equals_torch_topk(n):
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(3, n, 37, generator=gen)
    a[0, : n // 2, 0] = 1.5  # ties
    a[1, :, 1] = -torch.rand(n, generator=gen)  # all negative
    a[2, :, 2] = 0.0
    a[2, n // 3, 2] = -0.0
    for k in (1, 5, 8):
        ref = a.topk(min(k, n), dim=-2)
        for vals, rows in (top_rows(a, k), topk_rows(a, min(k, n))):
            assert torch.equal(vals, ref.values)
            assert torch.equal(a.gather(-2, rows), vals)  # the rows hold those values (ties: any of them)
            assert (rows.sort(dim=-2).values.diff(dim=-2) > 0).all()  # k distinct rows


@pytest.mark.parametrize("stack", [True, False])
@pytest.mark.parametrize("seq", [24, 5])  # 5: fewer blocks than k, every token a candidate
def test_running_counts_and_top_k_over_batches_equal_a_direct_pass(monkeypatch, stack, seq):
    monkeypatch.setattr(neurons, "MERGE_ELEMENTS", 300)  # merge every few batches
    monkeypatch.setattr(neurons, "STACK_ELEMENTS", 1 << 30 if stack else 0)
    gen = torch.Generator().manual_seed(1)
    batches = [{layer: torch.nn.functional.gelu(torch.randn(4, seq, 16, generator=gen) * 2) for layer in range(3)}
               for _ in range(7)]
    batches[2][1][0, 3, 5] = 50.0  # one planted maximum
    originals = [{layer: a.clone() for layer, a in acts.items()} for acts in batches]
    acc = NeuronAccumulator(threshold=0.1, top_k=5)
    for b, acts in enumerate(batches):
        acc.tokens += 4 * seq
        acc.add_layers(acts, b * 4 * seq)
    acc.finish()
    assert all(torch.equal(a, originals[b][layer]) for b, acts in enumerate(batches) for layer, a in acts.items())
    for layer in range(3):
        flat = torch.cat([acts[layer].reshape(-1, 16) for acts in batches]).double()
        assert torch.equal(acc.active[layer], (flat > 0.1).sum(0))
        ref = flat.topk(5, dim=0).values
        assert torch.equal(acc.top_values[layer].double(), ref)
        assert torch.equal(flat.gather(0, acc.top_index[layer]), ref)
    assert acc.top_index[1][0, 5] == 2 * 4 * seq + 3 and acc.top_values[1][0, 5] == 50.0


@pytest.mark.parametrize("stack", [True, False])
def test_geometry_sums_stacked_or_layer_by_layer_equal_float64(monkeypatch, stack):
    monkeypatch.setattr(representations, "STACK_ELEMENTS", 1 << 30 if stack else 0)
    gen = torch.Generator().manual_seed(2)
    offset = torch.randn(24, generator=gen) * 5  # a shared direction: anisotropic, as residual streams are
    batches = [[torch.randn(3, 20, 24, generator=gen) * (1 + layer) + offset for layer in range(4)] for _ in range(3)]
    acc = RepresentationAccumulator()
    for states in batches:
        acc.add_layers(states, torch.arange(0, 60, 7))
    rows = acc.rows()
    samples = acc.samples()
    for layer in range(4):
        x = torch.cat([b[layer].reshape(-1, 24) for b in batches]).double().numpy()
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        c = u @ u.T
        n = len(x)
        # float32 within a batch: unit vectors to ~6e-8 each, so the mean cosine to ~1e-8 here
        assert rows[layer]["anisotropy"] == pytest.approx((c.sum() - np.trace(c)) / (n * (n - 1)), abs=1e-7)
        assert rows[layer]["norm_mean"] == pytest.approx(np.linalg.norm(x, axis=1).mean(), rel=1e-7)
        ev = np.clip(np.linalg.eigvalsh(np.cov(x.T)), 0, None)
        p = ev[ev > 0] / ev.sum()
        assert rows[layer]["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)
        picked = np.concatenate([b[layer].reshape(-1, 24)[torch.arange(0, 60, 7)].numpy() for b in batches])
        assert np.array_equal(samples[layer].numpy(), picked)


@pytest.mark.parametrize("method", ["gram", "features"])
def test_cka_of_float32_states_to_1e_6_of_float64(method):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 48)) + 20.0  # a large mean, as residual streams have
    y = np.tanh((x - 20.0) @ rng.standard_normal((48, 64)) / 8) + 0.3 * rng.standard_normal((300, 64))
    z = rng.standard_normal((300, 32))
    got = cka_matrix([torch.tensor(v, dtype=torch.float32) for v in (x, y, z)], method=method)
    ref = np.array([[kornblith_cka(a - a.mean(0), b - b.mean(0)) for b in (x, y, z)] for a in (x, y, z)])
    assert np.abs(got - ref).max() < 1e-6
    assert got[0, 1] > 0.3 and abs(got[0, 2]) < 0.1  # not a trivial comparison


def test_head_scores_stacked_equal_layer_by_layer(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 5, (3, 16), generator=gen)
    atts = tuple(torch.softmax(torch.randn(3, 2, 16, 16, generator=gen) * 3, -1) for _ in range(3))
    masks = head_behaviour.score_masks(ids)
    stacked = head_behaviour.layer_scores(atts, masks)
    monkeypatch.setattr(head_behaviour, "STACK_ELEMENTS", 0)
    for a, b in zip(stacked, head_behaviour.layer_scores(atts, masks)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_every_lens_column_at_every_layer_equals_float64(tmp_path):
    import transformers as tf

    from layerscope.probes import load_model
    from layerscope.probes.activations import Collector, ActivationOptions, activation_data, find_blocks

    torch.manual_seed(0)
    m = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=3, n_head=2, n_embd=32, n_inner=64, n_positions=64, vocab_size=256,
                                         bos_token_id=None, eos_token_id=None, initializer_range=0.3))  # peaked logits
    m.save_pretrained(tmp_path / "m")
    model = load_model(tmp_path / "m")
    data = activation_data(model, ["the lens reads every layer through the final norm. " * 20], batches=2,
                           batch_size=3, seq_len=32)
    col = Collector(model, ActivationOptions(), data.n_batches, 3 * 32)
    for b in range(data.n_batches):
        col.run_batch(data.input_ids[b], data.labels[b], b * 96)
    col.close()
    rows, _ = col.lens_acc.rows()
    _, blocks = find_blocks(model)
    module = model.module
    sums = np.zeros((4, 5))
    count = 0
    for b in range(data.n_batches):
        captured = {}
        hooks = [blk.register_forward_hook(lambda mod, a, o, i=i: captured.__setitem__(i + 1, o[0] if isinstance(o, tuple) else o))
                 for i, blk in enumerate(blocks)]
        with torch.no_grad():
            out = module(input_ids=data.input_ids[b], output_hidden_states=True)
            captured[0] = out.hidden_states[0]
            final = torch.log_softmax(out.logits.double(), -1).reshape(-1, 256)
            for h in hooks:
                h.remove()
            labels = data.labels[b].reshape(-1)
            keep = labels != -100
            for layer in range(4):
                logits = out.logits if layer == 3 else module.lm_head(module.transformer.ln_f(captured[layer]))
                lp = torch.log_softmax(logits.double(), -1).reshape(-1, 256)[keep]
                f = final[keep]
                t = labels[keep]
                sums[layer] += [float(-lp.gather(1, t[:, None]).sum()), float((lp.argmax(1) == f.argmax(1)).sum()),
                                float((f.exp() * (f - lp)).sum()), float(-(lp.exp() * lp).sum()),
                                float((lp.argmax(1) == t).sum())]
        count += int(keep.sum())
    for layer, row in enumerate(rows):
        ref = sums[layer] / count
        assert row["loss"] == pytest.approx(ref[0], rel=1e-5)
        assert row["top1_agreement"] == pytest.approx(ref[1], abs=1e-9)
        assert row["kl_to_final"] == pytest.approx(ref[2], rel=1e-4, abs=1e-6)
        assert row["entropy"] == pytest.approx(ref[3], rel=1e-5)
        assert row["top1_accuracy"] == pytest.approx(ref[4], abs=1e-9)
    assert rows[-1]["kl_to_final"] == 0.0 and rows[-1]["top1_agreement"] == 1.0
    assert rows[0]["kl_to_final"] > 0.1  # early layers differ from the final prediction: not trivial


def test_counts_with_a_threshold_and_a_nan_equal_the_comparison():
    a = torch.randn(2, 50, 7, generator=torch.Generator().manual_seed(5))
    a[1, 4, 3] = float("nan")
    for threshold in (0.0, 0.3):
        ref = (a > threshold).sum(-2).double()
        assert torch.equal(neurons.active_counts(a.clone(), threshold).double(), ref)
        b = a.clone()
        assert torch.equal(neurons.active_counts(b, threshold, out=b).double(), ref)  # in place on its own input
