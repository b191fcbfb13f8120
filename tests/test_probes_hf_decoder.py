"""Landscape and gradient health on a tiny Hugging Face decoder (Llama: RMSNorm, rotary, gated MLP,
GQA), checked against direct computations with the model's own transformers forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import checkpoints
from layerscope.probes import Objective, load_data, load_model
from layerscope.probes.gradients import GradientOptions, gradient_health
from layerscope.probes.landscape import landscape

SMALL = dict(seq_len=32, batches=2, batch_size=4)


def _direct_loss(folder, data) -> float:
    """Mean token cross-entropy of transformers' own LlamaForCausalLM on the probe's batches."""
    import transformers as tf

    model = tf.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(data.input_ids.shape[0]):
            logits = model(input_ids=data.input_ids[b]).logits
            labels = data.labels[b]
            mask = labels != -100
            ce = torch.nn.functional.cross_entropy(logits[mask].double(), labels[mask], reduction="sum")
            total, count = total + float(ce), count + int(mask.sum())
    return total / count


def test_interpolation_between_two_hf_decoders_ends_at_their_own_losses(tmp_path):
    a = checkpoints.build_hf("llama", tmp_path / "a", seed=1)
    b = checkpoints.build_hf("llama", tmp_path / "b", seed=2)
    result = landscape([a, b], None, points=5, store=str(tmp_path / "s.sqlite"), **SMALL)
    data = load_data(load_model(a), None, **SMALL)
    t = result.table.sort_values("alpha")
    assert len(t) == 5
    assert t["loss"].iloc[0] == pytest.approx(_direct_loss(a, data), rel=1e-5)
    assert t["loss"].iloc[-1] == pytest.approx(_direct_loss(b, data), rel=1e-5)
    ends = np.interp(t["alpha"], [0, 1], [t["loss"].iloc[0], t["loss"].iloc[-1]])
    assert result.summary["barrier"] == pytest.approx(float(np.max(t["loss"].to_numpy() - ends)), rel=1e-9, abs=1e-12)


def test_gradient_health_on_an_hf_decoder_equals_a_direct_backward(tmp_path):
    folder = checkpoints.build_hf("llama", tmp_path / "m", seed=3)
    model = load_model(folder)
    data = load_data(model, None, **SMALL)
    result = gradient_health(Objective(model, data), GradientOptions())
    model.module.zero_grad()
    sum(Objective(model, data).batch_term(b) for b in range(data.n_batches)).backward()
    for _, row in result.tensors.iterrows():
        assert row["grad_norm"] == pytest.approx(float(model.params[row["name"]].grad.double().norm()), rel=1e-4, abs=1e-9)
    assert result.neurons is not None and len(result.neurons) == 2  # one row per layer of the gated MLP
    assert np.isfinite(result.noise["per_example"]["B_simple"])
