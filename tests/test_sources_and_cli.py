"""Every source format gives the same numbers; the CLI writes the promised table."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

import checkpoints
import layerscope
from layerscope.cli import main
from layerscope.sources import open_source

REQUIRED_COLUMNS = [
    "name", "layer", "role", "shape", "dtype", "numel", "mean", "std", "min", "max", "abs_mean", "zero_fraction",
    "frobenius_norm", "nan_count", "inf_count", "spectral_norm", "stable_rank", "numerical_rank", "condition_number",
    "energy_rank_90", "energy_rank_98", "energy_rank_99", "energy_rank_90_ratio", "energy_rank_98_ratio",
    "energy_rank_99_ratio", "entropy_rank", "alpha", "alpha_weighted", "log_norm", "log_spectral_norm",
    "mp_sigma", "mp_edge", "mp_spikes", "mp_ks", "mp_softrank", "error",
]
SPECTRAL = ["spectral_norm", "stable_rank", "entropy_rank", "alpha", "numerical_rank"]


def _by_name(result):
    return result.table.set_index("name")[SPECTRAL + ["mean", "std"]].sort_index()


@pytest.mark.parametrize("fmt", ["sharded", "bin", "sharded_bin"])
def test_formats_agree_with_single_safetensors(tmp_path, fmt):
    single = layerscope.analyze(checkpoints.build_hf("qwen2", tmp_path / "single"), cache=False)
    other = layerscope.analyze(checkpoints.build_hf("qwen2", tmp_path / fmt, fmt=fmt), cache=False)
    pd.testing.assert_frame_equal(_by_name(single), _by_name(other))


def test_live_module_agrees_with_its_saved_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    path = checkpoints.build_hf("mistral", tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(path)
    from_module = layerscope.analyze(model, cache=False)
    from_file = layerscope.analyze(path, cache=False)
    pd.testing.assert_frame_equal(_by_name(from_module), _by_name(from_file))


def test_compiled_ddp_style_prefixes_are_stripped_on_live_modules():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    wrapper = torch.nn.Module()
    wrapper.module = model  # what DistributedDataParallel looks like
    names = open_source(wrapper).names()
    assert names == ["0.weight", "0.bias"]


def test_nanogpt_checkpoint_is_analysed(tmp_path):
    path = checkpoints.build_nanogpt(tmp_path / "ckpt.pt", iter_num=42)
    result = layerscope.analyze(path)
    t = result.table.set_index("name")
    assert result.source.step == 42
    assert {"transformer.h.0.attn.c_attn.weight[q]", "transformer.h.1.attn.c_attn.weight[v]"} <= set(t.index)
    assert t.loc["transformer.h.0.attn.c_attn.weight[k]", "shape"] == "64×64"
    # lm_head is tied to wte in nanoGPT: the same content, analysed once
    assert t.loc["lm_head.weight", "spectral_norm"] == t.loc["transformer.wte.weight", "spectral_norm"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_upcast_one_tensor_at_a_time(tmp_path, dtype):
    path = checkpoints.build_hf("llama", tmp_path / "half", dtype=dtype)
    result = layerscope.analyze(path)
    t = result.table.set_index("name")
    name = "model.layers.0.mlp.down_proj.weight"
    w = open_source(path).load(name)
    assert w.dtype == dtype and t.loc[name, "dtype"] == str(dtype).removeprefix("torch.")
    exact = torch.linalg.svdvals(w.double())
    assert t.loc[name, "spectral_norm"] == pytest.approx(float(exact[0]), rel=1e-6)


def _fake_hub_cache(tmp_path, monkeypatch, repo="acme/tiny-llama"):
    """A Hugging Face cache laid out as huggingface_hub writes it, so the hub path runs offline."""
    model = checkpoints.build_hf("llama", tmp_path / "src")
    home = tmp_path / "hf"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = home / "hub" / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in model.iterdir():
        shutil.copy(f, snap / f.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return repo


def test_hub_repo_id_offline_from_cache(tmp_path, monkeypatch):
    repo = _fake_hub_cache(tmp_path, monkeypatch)
    anatomy = layerscope.inspect(repo)
    assert anatomy.family == "llama" and anatomy.dims.n_kv_heads == 2


def test_hub_repo_id_missing_offline_is_one_line(tmp_path, monkeypatch, capsys):
    _fake_hub_cache(tmp_path, monkeypatch)
    code = main(["info", "nobody/not-cached"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "nobody/not-cached" in err


def test_cli_analyze_writes_every_column(tmp_path, capsys):
    out = tmp_path / "minilm.csv"
    code = main(["analyze", str(checkpoints.minilm_dir()), "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "entropy_rank by layer and role" in stdout and "attn.q" in stdout
    table = pd.read_csv(out)
    assert list(table.columns) == REQUIRED_COLUMNS
    assert len(table) == 104
    row = table.set_index("name").loc["encoder.layer.0.attention.self.query.weight"]
    assert row["role"] == "attn.q" and row["layer"] == 0 and row["shape"] == "384×384"


@pytest.mark.parametrize("suffix", [".json", ".parquet"])
def test_cli_other_output_formats(tmp_path, capsys, suffix):
    path = checkpoints.write_low_rank_safetensors(tmp_path / "m.safetensors")[0]
    out = tmp_path / f"t{suffix}"
    assert main(["analyze", str(path), "--out", str(out), "--quiet", "--metrics", "stats,alpha"]) == 0
    table = pd.read_json(out) if suffix == ".json" else pd.read_parquet(out)
    assert "alpha" in table.columns and "spectral_norm" not in table.columns and "std" in table.columns


def test_cli_info_json(capsys):
    assert main(["info", str(checkpoints.minilm_dir()), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "bert" and info["dims"]["vocab_size"] == 30522 and info["parameters"] == 22713216 and info["buffers"] == {"embeddings.position_ids": 512}


def test_cli_metrics_lists_registry(capsys):
    assert main(["metrics"]) == 0
    out = capsys.readouterr().out
    for name in ("alpha_weighted", "energy_rank_99_ratio", "frobenius_norm"):
        assert name in out


@pytest.mark.parametrize("ext,text", [
    (".json", '{"metrics": ["alpha", "std"], "workers": 1}'),
    (".toml", 'metrics = ["alpha", "std"]\nworkers = 1\n'),
    (".yaml", "metrics: [alpha, std]\nworkers: 1\n"),
])
def test_config_files_and_flag_override(tmp_path, capsys, ext, text):
    cfg = tmp_path / f"c{ext}"
    cfg.write_text(text)
    path = checkpoints.write_low_rank_safetensors(tmp_path / "m.safetensors")[0]
    out = tmp_path / "o.csv"
    assert main(["analyze", str(path), "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert [c for c in pd.read_csv(out).columns if c in ("alpha", "std", "spectral_norm")] == ["std", "alpha"]
    assert main(["analyze", str(path), "--config", str(cfg), "--metrics", "spectral_norm", "--out", str(out), "--quiet"]) == 0
    assert "alpha" not in pd.read_csv(out).columns


def test_cuda_request_without_gpu_falls_back_to_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    path = checkpoints.write_low_rank_safetensors(tmp_path / "m.safetensors")[0]
    cpu = layerscope.analyze(path, cache=False).table
    cuda = layerscope.analyze(path, cache=False, device="cuda").table
    pd.testing.assert_series_equal(cpu["spectral_norm"], cuda["spectral_norm"])
