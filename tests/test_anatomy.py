"""Roles, layers, dims and fused-matrix splits on real checkpoints of every supported family."""

from __future__ import annotations


import pytest
import torch

import checkpoints
import layerscope
from layerscope.anatomy import ROLES, build_anatomy, classify
from layerscope.sources import open_source

PER_LAYER_ROLES = {
    "gpt2": {"attn.qkv", "attn.o", "mlp.up", "mlp.down", "bias"},
    "llama": {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"},
    "mistral": {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"},
    "qwen2": {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "bias"},
    "gpt_neox": {"attn.qkv", "attn.o", "mlp.up", "mlp.down", "bias"},
    "phi3": {"attn.qkv", "attn.o", "mlp.gate_up", "mlp.down"},
    "mixtral": {"attn.q", "attn.k", "attn.v", "attn.o", "moe.router", "moe.expert.gate", "moe.expert.up", "moe.expert.down"},
    "bert": {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down", "bias"},
}
DIM_KEYS = ("n_layers", "d_model", "d_ff", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "n_experts")


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin", "sharded_bin"])
@pytest.mark.parametrize("arch", checkpoints.ARCHS)
def test_roles_layers_and_dims(arch, fmt, tmp_path):
    path = checkpoints.build_hf(arch, tmp_path / arch, fmt=fmt)
    anatomy = layerscope.inspect(path)
    expected = checkpoints.expected(arch)
    assert {k: getattr(anatomy.dims, k) for k in DIM_KEYS} == {k: expected[k] for k in DIM_KEYS}
    assert anatomy.dims.source == "config"
    assert anatomy.family == arch
    assert set(anatomy.entries) == set(checkpoints.list_disk_tensors(path))
    for layer in range(expected["n_layers"]):
        roles = {e.role for e in anatomy.entries.values() if e.layer == layer and e.role != "norm"}
        assert roles == PER_LAYER_ROLES[arch], (layer, roles)
    assert len(anatomy.by_role("embed.token")) == 1
    assert len(anatomy.by_role("lm_head")) == (0 if fmt in ("safetensors", "sharded") and expected["tied_embeddings"] or arch == "bert" else 1)
    assert all(e.role in ROLES for e in anatomy.entries.values())
    if expected["tied_embeddings"] is not None and arch != "bert":
        assert anatomy.tied_embeddings == expected["tied_embeddings"]
    if arch == "mixtral":
        experts = {e.expert for e in anatomy.entries.values() if e.role.startswith("moe.expert")}
        assert experts == set(range(expected["n_experts"]))


def test_dims_inferred_from_shapes_without_config(tmp_path):
    path = checkpoints.build_hf("llama", tmp_path / "llama")
    (path / "config.json").unlink()
    anatomy = layerscope.inspect(path)
    expected = checkpoints.expected("llama")
    assert anatomy.dims.source == "shapes"
    for key in ("n_layers", "d_model", "d_ff", "vocab_size"):
        assert getattr(anatomy.dims, key) == expected[key], key
    # q rows / k rows = n_heads / n_kv_heads holds whatever head_dim is guessed
    assert anatomy.dims.n_heads // anatomy.dims.n_kv_heads == expected["n_heads"] // expected["n_kv_heads"]
    assert anatomy.family == "llama"


def test_bert_with_and_without_prefix(tmp_path):
    plain = layerscope.inspect(checkpoints.build_hf("bert", tmp_path / "plain"))
    prefixed = layerscope.inspect(checkpoints.build_bert_prefixed(tmp_path / "prefixed"))
    strip = lambda name: name.removeprefix("bert.")  # noqa: E731
    plain_roles = {n: (e.role, e.layer) for n, e in plain.entries.items()}
    prefixed_roles = {strip(n): (e.role, e.layer) for n, e in prefixed.entries.items() if n.startswith("bert.")}
    assert {n: r for n, r in plain_roles.items() if not n.startswith("pooler.")} == prefixed_roles  # MLM has no pooler
    assert plain.role_counts()["attn.q"] == 2


def test_minilm_anatomy():
    anatomy = layerscope.inspect(checkpoints.minilm_dir())
    d = anatomy.dims
    assert (d.n_layers, d.d_model, d.d_ff, d.n_heads, d.vocab_size) == (6, 384, 1536, 12, 30522)
    assert anatomy.role_counts()["attn.q"] == 6
    assert anatomy.entries["embeddings.position_ids"].role == "other"


def test_nanogpt_checkpoint_prefixes_step_and_layout(tmp_path):
    path = checkpoints.build_nanogpt(tmp_path / "ckpt.pt", iter_num=250, compiled=True)
    source = open_source(path)
    assert source.format == "nanogpt" and source.step == 250
    assert not any(n.startswith("_orig_mod.") for n in source.names())
    anatomy = build_anatomy(source.infos, source.config)
    assert anatomy.family == "nanogpt" and anatomy.tied_embeddings is True
    qkv = anatomy.entries["transformer.h.0.attn.c_attn.weight"]
    assert qkv.role == "attn.qkv" and not qkv.transposed  # nn.Linear layout, unlike HF GPT-2


def _gpt2_reference_q_k_v(model, x):
    attn = model.transformer.h[0].attn
    out = x @ attn.c_attn.weight + attn.c_attn.bias  # Conv1D: y = x W + b
    return out.split(model.config.n_embd, dim=-1)


def test_split_qkv_gpt2_conv1d_matches_the_model(tmp_path):
    path = checkpoints.build_hf("gpt2", tmp_path / "gpt2")
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(path)
    anatomy = layerscope.inspect(path)
    name = "transformer.h.0.attn.c_attn.weight"
    parts = anatomy.split_qkv(name, open_source(path).load(name))
    x = torch.randn(3, 64)
    for ref, key in zip(_gpt2_reference_q_k_v(model, x), "qkv"):
        bias = dict(zip("qkv", model.transformer.h[0].attn.c_attn.bias.split(64)))[key]
        torch.testing.assert_close(x @ parts[key].T + bias, ref)


def test_split_qkv_neox_interleaved_matches_the_model(tmp_path):
    path = checkpoints.build_hf("gpt_neox", tmp_path / "neox")
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(path)
    anatomy = layerscope.inspect(path)
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    parts = anatomy.split_qkv(name, open_source(path).load(name))
    attn = model.gpt_neox.layers[0].attention
    x = torch.randn(5, 64)
    # the model's own reshaping (GPTNeoXAttention.forward): view(..., heads, 3 * head_size).chunk(3)
    qkv = torch.nn.functional.linear(x, attn.query_key_value.weight).view(5, 4, 3 * 16)
    for ref, key in zip(qkv.chunk(3, dim=-1), "qkv"):
        torch.testing.assert_close(x @ parts[key].T, ref.reshape(5, 64))
    assert [h.shape for h in anatomy.heads(parts["q"])] == [torch.Size([16, 64])] * 4


def test_split_phi3_fused_qkv_and_gate_up(tmp_path):
    path = checkpoints.build_hf("phi3", tmp_path / "phi3")
    anatomy = layerscope.inspect(path)
    name = "model.layers.0.self_attn.qkv_proj.weight"
    w = open_source(path).load(name)
    parts = anatomy.split_qkv(name, w)
    assert [tuple(parts[k].shape) for k in "qkv"] == [(64, 64), (32, 64), (32, 64)]  # GQA: 4 q heads, 2 kv heads
    torch.testing.assert_close(torch.cat([parts["q"], parts["k"], parts["v"]]), w)
    gate_up = anatomy.parts("model.layers.0.mlp.gate_up_proj.weight")
    assert [(p.suffix, p.role) for p in gate_up] == [("", "mlp.gate_up"), ("gate", "mlp.gate"), ("up", "mlp.up")]


def test_unknown_names_are_other_and_never_crash(tmp_path):
    tensors = {"weird.thing": torch.randn(4, 4), "a.b.c.d.e.f": torch.randn(3), "layers.x.mystery.weight": torch.randn(2, 5)}
    checkpoints.save_safetensors(tensors, tmp_path / "w.safetensors")
    anatomy = layerscope.inspect(tmp_path / "w.safetensors")
    assert {e.role for e in anatomy.entries.values()} == {"other"}
    assert anatomy.family == "unknown"
    result = layerscope.analyze(tmp_path / "w.safetensors")
    assert len(result.table) == 3


@pytest.mark.parametrize("name,role", [
    ("model.layers.3.self_attn.q_proj.weight", "attn.q"),
    ("encoder.layer.0.attention.output.dense.weight", "attn.o"),
    ("encoder.layer.0.output.dense.weight", "mlp.down"),
    ("transformer.h.1.mlp.c_proj.weight", "mlp.down"),
    ("transformer.h.1.attn.c_proj.weight", "attn.o"),
    ("model.layers.0.mlp.gate.weight", "moe.router"),
    ("model.layers.0.mlp.experts.gate_up_proj", "moe.expert.gate_up"),
    ("model.layers.0.mlp.gate_proj.weight", "mlp.gate"),
    ("model.layers.0.input_layernorm.weight", "norm"),
    ("transformer.h.0.attn.c_attn.bias", "bias"),
    ("transformer.ln_f.bias", "norm"),
    ("embed_out.weight", "lm_head"),
])
def test_classify(name, role):
    assert classify(name) == role


def test_live_mixtral_module_fused_experts_are_split(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(checkpoints.tiny_config("mixtral"))
    result = layerscope.analyze(model)
    t = result.table
    gate_rows = t[(t["role"] == "moe.expert.gate") & (t["layer"] == 0)]
    assert sorted(gate_rows["expert"].tolist()) == [0, 1, 2, 3]
    assert (gate_rows["shape"] == "128×64").all()
    # each expert's gate slice is the first half of that expert's fused gate_up matrix
    fused = dict(model.named_parameters())["model.layers.0.mlp.experts.gate_up_proj"].detach()
    from reference import reference_metrics

    row = gate_rows[gate_rows["expert"] == 2].iloc[0]
    assert row["spectral_norm"] == pytest.approx(reference_metrics(fused[2, :128].double().numpy())["spectral_norm"], rel=1e-6)


@pytest.mark.parametrize("arch,fmt", [("gpt2", "bin"), ("gpt2", "safetensors"), ("llama", "sharded"),
                                      ("bert", "safetensors"), ("phi3", "safetensors")])
def test_parameter_count_equals_the_models_own(arch, fmt, tmp_path):
    """`info`'s parameter count is ``sum(p.numel() for p in model.parameters())`` of the live model: int
    buffers (BERT's ``position_ids``) listed apart, a tied LM head saved twice (GPT-2 ``.bin``) counted once."""
    path = checkpoints.build_hf(arch, tmp_path / arch, fmt=fmt)
    model = checkpoints._make_hf_model(arch, 0, torch.float32)
    anatomy = layerscope.inspect(path)
    assert anatomy.parameter_count == sum(p.numel() for p in model.parameters())
    on_disk = checkpoints.list_disk_tensors(path)
    ints = {n for n, (_, dtype) in on_disk.items() if not dtype.startswith(("F", "BF", "float", "bfloat"))}
    assert set(anatomy.buffers()) == ints


def test_parameter_count_minilm_and_nanogpt(tmp_path):
    from transformers import BertModel

    minilm = checkpoints.minilm_dir()
    model = BertModel.from_pretrained(minilm)
    anatomy = layerscope.inspect(minilm)
    assert anatomy.parameter_count == sum(p.numel() for p in model.parameters()) == 22_713_216
    assert anatomy.buffers() == {"embeddings.position_ids": 512}
    # nanoGPT stores its tied lm_head.weight beside transformer.wte.weight: one parameter tensor
    path = checkpoints.build_nanogpt(tmp_path / "ckpt.pt")
    from nanogpt_model import GPT, GPTConfig

    ckpt = torch.load(path, weights_only=True)
    assert any(k.endswith("lm_head.weight") for k in ckpt["model"])
    nano = GPT(GPTConfig(**ckpt["model_args"]))
    assert layerscope.inspect(path).parameter_count == sum(p.numel() for p in nano.parameters())
    # nanoGPT without flash attention saves its float causal mask (1, 1, T, T) as attn.bias: a buffer
    for i in range(ckpt["model_args"]["n_layer"]):
        ckpt["model"][f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
    torch.save(ckpt, tmp_path / "masked.pt")
    masked = layerscope.inspect(tmp_path / "masked.pt")
    assert masked.parameter_count == sum(p.numel() for p in nano.parameters())
    assert masked.buffers() == {f"transformer.h.{i}.attn.bias": 64 * 64 for i in range(ckpt["model_args"]["n_layer"])}
