"""Head circuits from head_dim × head_dim products equal the direct d_model × d_model computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import checkpoints
import layerscope
from layerscope.cli import main
from layerscope.sources import open_source

RTOL = 1e-4


def direct_circuit(a: np.ndarray) -> dict[str, float]:
    """What a notebook does: form the d_model × d_model circuit, then eigvals and svd."""
    s = np.linalg.svd(a, compute_uv=False)
    eig = np.linalg.eigvals(a)
    top = np.abs(eig).max()
    nz = eig[np.abs(eig) > 1e-10 * top]
    p = s[s > 0] / s.sum()
    energy = np.cumsum(s**2)
    return {
        "spectral_norm": s[0],
        "frobenius_norm": np.linalg.norm(a),
        "entropy_rank": math.exp(-(p * np.log(p)).sum()),
        "energy_rank_99": int(np.searchsorted(energy, 0.99 * energy[-1]) + 1),
        "asymmetry": np.linalg.norm(a - a.T) / np.linalg.norm(a),
        "eig_real_fraction": np.abs(nz.real).sum() / np.abs(nz).sum(),
        "eig_positive_fraction": np.mean(nz.real > 0),
        "top_eig_abs": top,
        "copying_score": nz.real.sum() / np.abs(nz).sum(),
    }


def weights(path, names):
    src = open_source(path)
    return {k: src.load(n).double().numpy() for k, n in names.items()}


def check_layer(table, layer, wq, wk, wv, wo, n_heads, n_kv, hd, heads_to_check):
    group = n_heads // n_kv
    for h in heads_to_check:
        g = h // group
        q, k = wq[h * hd:(h + 1) * hd], wk[g * hd:(g + 1) * hd]
        v, o = wv[g * hd:(g + 1) * hd], wo[:, h * hd:(h + 1) * hd]
        row = table[(table["layer"] == layer) & (table["head"] == h)].iloc[0]
        assert row["kv_head"] == g
        for circuit, a in (("qk", q.T @ k), ("ov", o @ v)):
            for key, expected in direct_circuit(a).items():
                got = row[f"{circuit}_{key}"]
                if key == "energy_rank_99":
                    assert got == expected, (layer, h, circuit, key)
                else:
                    assert got == pytest.approx(expected, rel=RTOL, abs=1e-12), (layer, h, circuit, key, got, expected)


def test_minilm_heads_match_direct_computation():
    result = layerscope.heads(checkpoints.minilm_dir())
    t = result.table
    assert len(t) == 6 * 12
    for layer in (0, 5):
        p = f"encoder.layer.{layer}.attention."
        w = weights(checkpoints.minilm_dir(), {"q": p + "self.query.weight", "k": p + "self.key.weight",
                                               "v": p + "self.value.weight", "o": p + "output.dense.weight"})
        check_layer(t, layer, w["q"], w["k"], w["v"], w["o"], 12, 12, 32, heads_to_check=range(12))
    cats = result.categories  # against random heads (tests/test_findings.py checks the null itself)
    lo, hi = cats.rank_bounds
    assert hi > 32 and not cats.high_rank  # "higher rank than random" is impossible at head_dim 32
    assert all(t.set_index(["layer", "head"]).loc[h, "qk_entropy_rank"] < lo for h in cats.low_rank)
    others = t[~t.set_index(["layer", "head"]).index.isin(cats.low_rank)]
    assert (others["qk_entropy_rank"] >= lo).all()
    assert len(t.loc[0, "ov_top_eigs"]) == 8


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gpt2", "gpt_neox"])
def test_gqa_and_fused_layouts_match_direct_computation(tmp_path, arch):
    path = checkpoints.build_hf(arch, tmp_path / arch)
    exp = checkpoints.expected(arch)
    nh, nkv, hd = exp["n_heads"], exp["n_kv_heads"], exp["head_dim"]
    t = layerscope.heads(path).table
    assert len(t) == exp["n_layers"] * nh
    src = open_source(path)
    anatomy = layerscope.inspect(path)
    for layer in range(exp["n_layers"]):
        entries = {e.role: e for e in anatomy.entries.values() if e.layer == layer and e.role.startswith("attn.")}
        if "attn.qkv" in entries:
            parts = anatomy.split_qkv(entries["attn.qkv"].name, src.load(entries["attn.qkv"].name).double())
            wq, wk, wv = (parts[x].numpy() for x in "qkv")
        else:
            wq, wk, wv = (src.load(entries[f"attn.{x}"].name).double().numpy() for x in "qkv")
        o = src.load(entries["attn.o"].name).double().numpy()
        wo = o.T if entries["attn.o"].transposed else o
        check_layer(t, layer, wq, wk, wv, wo, nh, nkv, hd, heads_to_check=range(nh))


def test_heads_are_cached(tmp_path, monkeypatch):
    import layerscope.weights.heads as heads_module

    store = str(tmp_path / "s.sqlite")
    real, calls = heads_module.layer_heads, []

    def counted(*args, **kwargs):  # a spy: the real computation, counted
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(heads_module, "layer_heads", counted)
    first = layerscope.heads(checkpoints.minilm_dir(), store=store)
    assert len(calls) == 6  # one computation per layer the first time
    second = layerscope.heads(checkpoints.minilm_dir(), store=store)
    assert len(calls) == 6  # ... and none the second time: every layer came from the store
    assert first.table.drop(columns=["qk_top_eigs", "ov_top_eigs"]).equals(
        second.table.drop(columns=["qk_top_eigs", "ov_top_eigs"]))


def test_model_without_attention_is_one_line(tmp_path, capsys):
    path = checkpoints.save_safetensors({"mlp.weight": torch.randn(8, 8)}, tmp_path / "x.safetensors")
    code = main(["heads", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "attention" in err


def test_mlp_down_spectra_match_float64_and_reuse_the_store(tmp_path):
    store = str(tmp_path / "s.sqlite")
    fresh = layerscope.mlp_down_spectra(checkpoints.minilm_dir(), store=store)
    layerscope.analyze(checkpoints.minilm_dir(), store=store, metrics="condition_number")
    again = layerscope.mlp_down_spectra(checkpoints.minilm_dir(), store=store)
    assert list(fresh["layer"]) == list(range(6))
    src = open_source(checkpoints.minilm_dir())
    for row, cached in zip(fresh.itertuples(), again.itertuples()):
        s = np.linalg.svd(src.load(row.name).double().numpy(), compute_uv=False)
        np.testing.assert_allclose(row.explained_variance, np.cumsum(s**2) / np.sum(s**2), rtol=1e-9)
        assert row.condition_number == pytest.approx(s[0] / s[-1], rel=1e-6)
        np.testing.assert_array_equal(row.explained_variance, cached.explained_variance)
