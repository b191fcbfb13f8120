"""Self-check of the fixture builders in tests/checkpoints.py (not of layerscope)."""

from __future__ import annotations

import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch

import checkpoints as C
from conftest import require

safetensors_torch = require("safetensors.torch")
transformers = require("transformers")


def _weight_files(d, fmt):
    if fmt == "safetensors":
        return [d / "model.safetensors"]
    if fmt == "bin":
        return [d / "pytorch_model.bin"]
    pattern = "model-*-of-*.safetensors" if fmt == "sharded" else "pytorch_model-*-of-*.bin"
    return sorted(d.glob(pattern))


@pytest.mark.parametrize("fmt", C.FORMATS)
@pytest.mark.parametrize("arch", C.ARCHS)
def test_build_hf_files_and_reload(arch, fmt, tmp_path):
    d = C.build_hf(arch, tmp_path / "ckpt", fmt=fmt, seed=0)
    names = {p.name for p in d.iterdir()}
    assert "config.json" in names
    assert json.loads((d / "config.json").read_text())["model_type"] == arch
    files = _weight_files(d, fmt)
    assert files and all(f.is_file() for f in files)

    if fmt == "safetensors":
        assert not any(n.endswith(".bin") or n.endswith(".index.json") for n in names)
    elif fmt == "bin":
        assert not any(n.endswith(".safetensors") or n.endswith(".index.json") for n in names)
    else:
        index_name = "model.safetensors.index.json" if fmt == "sharded" else "pytorch_model.bin.index.json"
        assert index_name in names
        assert len(files) >= 2
        n = len(files)
        suffix = ".safetensors" if fmt == "sharded" else ".bin"
        stem = "model" if fmt == "sharded" else "pytorch_model"
        assert [f.name for f in files] == [f"{stem}-{i:05d}-of-{n:05d}{suffix}" for i in range(1, n + 1)]
        index = json.loads((d / index_name).read_text())
        assert set(index) == {"metadata", "weight_map"}
        assert index["metadata"]["total_size"] > 0
        assert set(index["weight_map"].values()) == {f.name for f in files}
        # every weight_map entry really is in the shard it names
        on_disk = {}
        for f in files:
            if fmt == "sharded":
                for k in C.read_safetensors_header(f):
                    if k != "__metadata__":
                        on_disk[k] = f.name
            else:
                for k in torch.load(f, map_location="cpu", weights_only=True):
                    on_disk[k] = f.name
        assert on_disk == index["weight_map"]

    # the real library reloads it, with exactly the weights of a fresh seeded model
    cls = transformers.BertModel if arch == "bert" else transformers.AutoModelForCausalLM
    model, info = cls.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ref = C._make_hf_model(arch, 0, torch.float32).state_dict()
    got = model.state_dict()
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert torch.equal(got[k], v), k


def test_mixtral_on_disk_names_are_per_expert(tmp_path):
    for fmt in ("safetensors", "bin"):
        t = C.list_disk_tensors(C.build_hf("mixtral", tmp_path / fmt, fmt=fmt))
        for e in range(4):
            assert t[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"][0] == (128, 64)
            assert t[f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight"][0] == (64, 128)
            assert t[f"model.layers.0.block_sparse_moe.experts.{e}.w3.weight"][0] == (128, 64)
        assert t["model.layers.0.block_sparse_moe.gate.weight"][0] == (4, 64)
        assert not any("mlp.experts" in k for k in t)


def test_gpt2_tie_on_disk(tmp_path):
    st = C.list_disk_tensors(C.build_hf("gpt2", tmp_path / "st"))
    assert "lm_head.weight" not in st and st["transformer.wte.weight"][0] == (256, 64)
    sd = torch.load(C.build_hf("gpt2", tmp_path / "bin", fmt="bin") / "pytorch_model.bin", weights_only=True)
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()


@pytest.mark.parametrize("dtype,tag", [(torch.bfloat16, "BF16"), (torch.float16, "F16")])
def test_build_hf_half_precision(dtype, tag, tmp_path):
    d = C.build_hf("llama", tmp_path / "st", dtype=dtype)
    assert {v[1] for v in C.list_disk_tensors(d).values()} == {tag}
    d = C.build_hf("mixtral", tmp_path / "bin", fmt="sharded_bin", dtype=dtype)
    assert {v[1] for v in C.list_disk_tensors(d).values()} == {str(dtype).removeprefix("torch.")}


def test_builds_are_deterministic(tmp_path):
    a = C.build_hf("qwen2", tmp_path / "a", seed=3) / "model.safetensors"
    b = C.build_hf("qwen2", tmp_path / "b", seed=3) / "model.safetensors"
    c = C.build_hf("qwen2", tmp_path / "c", seed=4) / "model.safetensors"
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def test_expected_is_consistent_with_disk(arch_checkpoints):
    assert list(C.EXPECTED) == C.ARCHS == list(arch_checkpoints)
    for arch, d in arch_checkpoints.items():
        e = C.EXPECTED[arch]
        assert tuple(e) == C.EXPECTED_KEYS
        assert e == C.expected(arch)
        assert (e["n_layers"], e["d_model"], e["n_heads"], e["head_dim"], e["vocab_size"]) == (2, 64, 4, 16, 256)
        assert e["n_kv_heads"] == (2 if arch in C.GQA_ARCHS else 4)
        assert e["d_ff"] == (256 if arch == "gpt2" else 128)
        assert e["n_experts"] == (4 if arch == "mixtral" else 0)
        assert e["tied_embeddings"] == (arch in ("gpt2", "bert"))
        shapes = {k: v[0] for k, v in C.list_disk_tensors(d).items()}
        # (per-layer tensors excluded: with vocab 256 == 4*64, GPT-2's mlp.c_proj [256, 64]
        # and Phi-3's gate_up_proj [256, 64] have the embedding's shape too)
        emb = [
            k
            for k, s in shapes.items()
            if s == (e["vocab_size"], e["d_model"]) and not any(x in k for x in (".h.", "layers.", "layer."))
        ]
        # one embedding matrix when tied (head not on disk), embedding + head otherwise
        assert len(emb) == (1 if e["tied_embeddings"] else 2), (arch, emb)


def test_bert_prefixed(tmp_path):
    d = C.build_bert_prefixed(tmp_path / "mlm")
    t = C.list_disk_tensors(d)
    assert (d / "config.json").is_file()
    assert t["bert.encoder.layer.0.attention.self.query.weight"][0] == (64, 64)
    assert t["cls.predictions.transform.dense.weight"][0] == (64, 64)
    assert t["cls.predictions.bias"][0] == (256,)
    assert all(k.startswith(("bert.", "cls.predictions.")) for k in t)
    m = transformers.BertForMaskedLM.from_pretrained(d)
    assert m.config.hidden_size == 64


@pytest.mark.parametrize("compiled", [True, False])
def test_nanogpt_checkpoint(compiled, tmp_path):
    p = C.build_nanogpt(tmp_path / "out", iter_num=100, compiled=compiled)
    assert p.name == "ckpt.pt" and p.is_file()
    ck = torch.load(p, map_location="cpu", weights_only=True)
    assert set(ck) == {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"}
    assert ck["iter_num"] == 100
    assert isinstance(ck["best_val_loss"], float)
    assert ck["model_args"] == C.NANOGPT_MODEL_ARGS
    assert ck["optimizer"]["state"], "optimizer state should be populated"
    prefix = "_orig_mod." if compiled else ""
    sd = ck["model"]
    assert all(k.startswith("_orig_mod.") == compiled for k in sd)
    assert sd[prefix + "transformer.h.0.attn.c_attn.weight"].shape == (192, 64)
    assert sd[prefix + "transformer.h.0.mlp.c_fc.weight"].shape == (256, 64)
    assert sd[prefix + "lm_head.weight"].data_ptr() == sd[prefix + "transformer.wte.weight"].data_ptr()

    from nanogpt_model import GPT, GPTConfig

    model = GPT(GPTConfig(**ck["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in sd.items()})
    logits, loss = model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))
    assert logits.shape == (1, 8, 256) and torch.isfinite(loss)
    assert C.expected_nanogpt()["d_ff"] == 256


@pytest.mark.parametrize("container", ["zip", "legacy", "raw"])
def test_malicious_pickle_refused(container, tmp_path):
    marker = tmp_path / "pwned"
    p = C.write_malicious_pickle(tmp_path / "evil.bin", marker, container=container)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(p, map_location="cpu", weights_only=True)
    assert not marker.exists()


def test_malicious_pickle_payload_is_real(tmp_path):
    """Positive control: an unsafe load really runs the payload (harmless: creates a file in tmp)."""
    marker = tmp_path / "pwned"
    p = C.write_malicious_pickle(tmp_path / "evil.pt", marker, method="open")
    torch.load(p, map_location="cpu", weights_only=False)
    assert marker.exists()


def test_minilm_dir():
    d = C.minilm_dir()
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (d / name).is_file(), name
    e = C.expected_minilm()
    assert (e["n_layers"], e["d_model"], e["n_heads"], e["d_ff"]) == (6, 384, 12, 1536)


def _header_len(p):
    return struct.unpack("<Q", p.read_bytes()[:8])[0]


def test_bad_safetensors_files(tmp_path):
    load = safetensors_torch.load_file

    p = C.write_truncated_safetensors(tmp_path / "trunc.safetensors")
    h = C.read_safetensors_header(p)
    end = max(v["data_offsets"][1] for k, v in h.items() if k != "__metadata__")
    assert p.stat().st_size < 8 + _header_len(p) + end
    with pytest.raises(Exception):
        load(str(p))

    p = C.write_header_too_long(tmp_path / "long.safetensors")
    assert _header_len(p) > p.stat().st_size
    with pytest.raises(Exception):
        load(str(p))

    p = C.write_header_not_json(tmp_path / "notjson.safetensors")
    n = _header_len(p)
    assert 8 + n <= p.stat().st_size
    with pytest.raises(ValueError):
        json.loads(p.read_bytes()[8 : 8 + n])
    with pytest.raises(Exception):
        load(str(p))

    p = C.write_bad_byte_length(tmp_path / "badlen.safetensors")
    h = C.read_safetensors_header(p)  # valid JSON
    data_len = p.stat().st_size - 8 - _header_len(p)
    assert max(v["data_offsets"][1] for k, v in h.items() if k != "__metadata__") == data_len
    a = h["a.weight"]
    assert a["data_offsets"][1] - a["data_offsets"][0] != 4 * int(np.prod(a["shape"]))
    with pytest.raises(Exception):
        load(str(p))


def test_troubled_safetensors(tmp_path):
    p = C.write_troubled_safetensors(tmp_path / "t.safetensors")
    t = safetensors_torch.load_file(str(p))
    assert sorted(t) == sorted(C.TROUBLED_NAMES)
    assert t["good.weight"].shape == (64, 32) and torch.isfinite(t["good.weight"]).all()
    assert torch.isnan(t["nan.weight"]).any() and t["nan.weight"].dim() == 2
    assert torch.isinf(t["inf.weight"]).any() and t["inf.weight"].dim() == 2
    assert t["zero.weight"].dim() == 2 and not t["zero.weight"].any()
    assert t["empty.weight"].shape == (0, 8)
    assert t["row.weight"].shape == (1, 16)
    assert t["int.weight"].dtype == torch.int64 and t["int.weight"].dim() == 2
    assert t["vec.bias"].dim() == 1


def test_low_rank_safetensors(tmp_path):
    p, arrays = C.write_low_rank_safetensors(tmp_path / "lr.safetensors")
    t = safetensors_torch.load_file(str(p))
    assert sorted(t) == sorted(C.LOW_RANK_NAMES) == sorted(arrays)
    for k, a in arrays.items():
        assert a.dtype == np.float64 and t[k].dtype == torch.float32
        assert np.array_equal(t[k].double().numpy(), a)
        assert a.shape == C.LOW_RANK_SPECS[k]["shape"]
    s = np.linalg.svd(arrays["rank10.weight"], compute_uv=False)
    assert s[9] / s[0] > 1e-2 and s[10] / s[0] < 1e-6
    s = np.linalg.svd(arrays["illcond.weight"], compute_uv=False)
    assert 1e7 < s[0] / s[-1] < 1e9
    s = np.linalg.svd(arrays["wellcond.weight"], compute_uv=False)
    assert s[0] / s[-1] < 2.1
    assert arrays["wide.weight"].shape == (32, 80)


def test_conftest_environment(_layerscope_cache_dir):
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert os.environ["LAYERSCOPE_CACHE_DIR"] == str(_layerscope_cache_dir)
    assert _layerscope_cache_dir.is_dir() and not any(_layerscope_cache_dir.iterdir())
