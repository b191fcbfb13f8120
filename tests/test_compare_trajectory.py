"""Checkpoint comparison and training trajectories, on real weights and a really trained GPT.

References: zero drift on identical weights; SciPy's orthogonal Procrustes solution; task-vector
statistics and sign conflicts computed directly with NumPy.
"""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import load_file

import checkpoints
import layerscope
from layerscope.cli import main
from layerscope.change.drift import matrix_drift, procrustes_rotation, sign_conflicts, token_drift
from layerscope.errors import LayerscopeError


def _minilm_embedding(rows: int = 3000) -> torch.Tensor:
    tensors = load_file(str(checkpoints.minilm_dir() / "model.safetensors"))
    return tensors["embeddings.word_embeddings.weight"][:rows].clone()


def _random_orthogonal(n: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


# -- compare ------------------------------------------------------------------------------------
def test_identical_checkpoints_have_zero_drift(arch_checkpoints):
    result = layerscope.compare(arch_checkpoints["llama"], arch_checkpoints["llama"])
    t = result.table
    assert not result.mismatch
    assert (t["rel_change"] == 0).all()
    assert np.allclose(t["cosine"], 1.0, atol=1e-12)
    mats = t[t["procrustes_cosine"].notna()]
    assert len(mats) >= 10
    assert np.allclose(mats["procrustes_cosine"], 1.0, atol=1e-12) and (mats["procrustes_residual"] == 0).all()
    deltas = t[[c for c in t.columns if c.startswith("delta_")]].to_numpy(dtype=float)
    assert np.all(deltas[np.isfinite(deltas)] == 0) and np.isfinite(deltas).any()
    assert next(iter(result.tokens.values()))["mean_cosine"] == pytest.approx(1.0, abs=1e-12)


def test_compiled_nanogpt_compares_with_its_clean_twin(tmp_path):
    clean = checkpoints.build_nanogpt(tmp_path / "clean", seed=3)
    compiled = checkpoints.build_nanogpt(tmp_path / "compiled", seed=3, compiled=True)
    result = layerscope.compare(clean, compiled)
    assert not result.mismatch
    assert (result.table["rel_change"] == 0).all()
    assert "transformer.h.0.attn.c_attn.weight[q]" in set(result.table["name"])  # fused q/k/v slices compared too


def test_procrustes_recovers_a_known_rotation():
    a = _minilm_embedding().double()
    q = _random_orthogonal(a.shape[1], seed=1)
    b = a @ torch.from_numpy(q)
    d = matrix_drift(a, b)
    assert d["cosine"] < 0.2  # a rotation moves the weights a lot ...
    assert d["procrustes_cosine"] == pytest.approx(1.0, abs=1e-10)  # ... and Procrustes undoes it
    assert d["procrustes_residual"] < 1e-6
    r = procrustes_rotation(a, b)
    assert np.abs(r - q).max() < 1e-8
    tokens = token_drift(a, b, top_k=5)
    assert tokens["p10_cosine"] == pytest.approx(1.0, abs=1e-10) and tokens["mean_distance"] < 1e-8


def test_procrustes_matches_scipy_on_noisy_and_wide_matrices():
    rng = np.random.default_rng(2)
    a = _minilm_embedding(2000).double()
    b = a @ torch.from_numpy(_random_orthogonal(a.shape[1], 3)) + 0.01 * torch.from_numpy(rng.standard_normal(a.shape))
    for x, y in ((a, b), (a.T.contiguous(), b.T.contiguous())):  # tall: A R ≈ B; wide: R A ≈ B
        xn, yn = x.numpy(), y.numpy()
        if xn.shape[0] >= xn.shape[1]:
            r, _ = scipy.linalg.orthogonal_procrustes(xn, yn)
            aligned = xn @ r
        else:
            r, _ = scipy.linalg.orthogonal_procrustes(xn.T, yn.T)
            aligned = (xn.T @ r).T
        d = matrix_drift(x, y)
        assert d["procrustes_residual"] == pytest.approx(np.linalg.norm(aligned - yn) / np.linalg.norm(yn), rel=1e-9)
        assert d["procrustes_cosine"] == pytest.approx(
            np.sum(aligned * yn) / (np.linalg.norm(xn) * np.linalg.norm(yn)), rel=1e-9)
        assert d["rel_change"] == pytest.approx(np.linalg.norm(yn - xn) / np.linalg.norm(xn), rel=1e-12)


def test_token_drift_finds_the_moved_tokens_and_decodes_them():
    emb = _minilm_embedding(3000)
    other = emb.clone()
    moved = [1996, 2003, 2088]  # "the", "is", "world" in the MiniLM vocabulary
    gen = torch.Generator().manual_seed(0)
    for i in moved:
        other[i] = torch.randn(emb.shape[1], generator=gen) * emb[i].norm() / math.sqrt(emb.shape[1])
    q = torch.from_numpy(_random_orthogonal(emb.shape[1], 5)).float()
    result = layerscope.compare({"model.embed_tokens.weight": emb}, {"model.embed_tokens.weight": other @ q})
    tok = result.tokens["state_dict#2"]
    assert sorted(t["id"] for t in tok["most_drifted"][:3]) == moved
    assert tok["median_cosine"] > 0.999  # the rotation is undone for everything else


def test_token_texts_are_decoded_with_the_tokenizer(tmp_path):
    src = checkpoints.minilm_dir()
    tensors = load_file(str(src / "model.safetensors"))
    emb = tensors["embeddings.word_embeddings.weight"]
    emb[2088] = -emb[2088]
    other = tmp_path / "other"
    other.mkdir()
    checkpoints.save_safetensors(tensors, other / "model.safetensors")
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(src / name, other / name)
    result = layerscope.compare(src, other, spectral=False, procrustes=False, top_k=3)
    tok = next(iter(result.tokens.values()))
    assert tok["most_drifted"][0]["id"] == 2088 and tok["most_drifted"][0]["text"] == "world"
    assert tok["most_drifted"][0]["cosine"] == pytest.approx(-1.0, abs=1e-3)


def test_sign_conflicts_are_exact_on_constructed_task_vectors():
    n = 1000
    t1 = torch.ones(n, dtype=torch.float64)
    t2 = torch.zeros(n, dtype=torch.float64)
    t2[:250] = -2.0
    t2[250:750] = 3.0  # 250 conflicts, 500 agreements, 250 zeros (no sign)
    assert sign_conflicts([t1, t2]) == 0.25
    t3 = torch.zeros(n, dtype=torch.float64)
    t3[900:] = -1.0  # conflicts with t1 where t2 is 0: 100 more
    assert sign_conflicts([t1, t2, t3]) == 0.35


def test_task_vectors_against_numpy():
    rng = np.random.default_rng(7)
    base = {"model.layers.0.mlp.down_proj.weight": torch.from_numpy(rng.standard_normal((48, 96)))}
    tvs = [rng.standard_normal((48, 96)) * s for s in (0.1, 0.3)]
    tvs[1][:10] = -tvs[0][:10]  # make some rows conflict everywhere
    models = [{k: v + torch.from_numpy(tv) for k, v in base.items()} for tv in tvs]
    result = layerscope.compare(*models, base=base, spectral=False)
    row = result.task_vectors.iloc[0]
    a, b = tvs
    assert row["norm[state_dict#2]"] == pytest.approx(np.linalg.norm(a), rel=1e-12)
    assert row["cosine[state_dict#2~state_dict#3]"] == pytest.approx(
        np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-10)
    assert row["sign_conflict"] == pytest.approx(np.mean(np.sign(a) * np.sign(b) < 0), abs=0)
    # TIES trim: keep each vector's top 20% by magnitude, then count conflicts among what is kept
    keep = [np.abs(v) >= np.sort(np.abs(v).ravel())[-round(0.2 * v.size)] for v in (a, b)]
    expected = np.mean((np.sign(a) * keep[0] * np.sign(b) * keep[1]) < 0)
    assert row["sign_conflict_top20"] == pytest.approx(expected, abs=0)
    assert set(result.table["model"]) == {"state_dict#2", "state_dict#3"}  # drift base → each model too


def test_mismatched_models_are_listed_and_the_rest_compared(arch_checkpoints):
    llama = load_file(str(arch_checkpoints["llama"] / "model.safetensors"))
    other = dict(llama)
    dropped = "model.layers.1.mlp.up_proj.weight"
    del other[dropped]
    reshaped = "model.layers.0.mlp.down_proj.weight"
    other[reshaped] = other[reshaped][:, :8].clone()
    result = layerscope.compare(llama, other, spectral=False)
    problems = " | ".join(result.mismatch["state_dict#2"])
    assert dropped in problems and reshaped in problems and "shape" in problems
    assert len(result.table) > 10 and reshaped not in set(result.table["name"])
    with pytest.raises(LayerscopeError, match="no tensor in common"):
        layerscope.compare(llama, {"foo.weight": torch.ones(3, 3)})


def test_architectures_that_differ_are_named(arch_checkpoints):
    result = layerscope.compare(arch_checkpoints["llama"], arch_checkpoints["qwen2"], spectral=False, procrustes=False)
    assert any("architectures differ" in p for p in result.mismatch["qwen2"])


# -- on the trained GPT --------------------------------------------------------------------------
def test_compare_cli_on_trained_checkpoints(trained_run, tmp_path, capsys):
    first, last = trained_run["checkpoints"][0], trained_run["checkpoints"][-1]
    out = tmp_path / "drift.json"
    assert main(["compare", first, last, "--out", str(out), "--plot", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out
    assert "most changed matrices" in printed and "token drift" in printed
    payload = json.loads(out.read_text())
    drift = {r["name"]: r for r in payload["drift"]}
    assert 0 < drift["transformer.h.0.mlp.c_fc.weight"]["rel_change"] < 10
    assert drift["transformer.h.0.mlp.c_fc.weight"]["procrustes_cosine"] >= drift["transformer.h.0.mlp.c_fc.weight"]["cosine"]
    assert payload["tokens"] and (tmp_path / "plots" / "ckpt_000200" / "drift_by_layer.png").stat().st_size > 0
    tokens = next(iter(payload["tokens"].values()))  # a byte-level vocabulary without tokenizer.json: bytes
    texts = [t["text"] for t in tokens["least_drifted"] + tokens["most_drifted"]]
    assert all(len(t) == 1 or re.fullmatch(r"<0x[0-9A-F]{2}>", t) for t in texts)


def test_trajectory_over_the_trained_run(trained_run, tmp_path, capsys):
    assert main(["trajectory", str(trained_run["dir"]), "--out", str(tmp_path / "t.csv"),
                 "--plot", str(tmp_path / "plots")]) == 0
    assert "trajectory over 5 checkpoints" in capsys.readouterr().out
    result = layerscope.trajectory([trained_run["dir"]])
    assert [c.step for c in result.checkpoints] == [0, 50, 100, 150, 200]  # from iter_num in each ckpt
    summary = result.summary()
    assert math.isnan(summary["drift_from_first"].iloc[0])
    assert summary["drift_from_first"].iloc[-1] > summary["drift_from_first"].iloc[1] > 0
    # drift from the previous checkpoint shrinks as the learning rate decays
    assert summary["drift_from_prev"].iloc[-1] < summary["drift_from_prev"].iloc[1]
    assert result.computed == 0  # everything was in the store from the CLI run
    per_layer = result.over_steps("entropy_rank", "mlp.up")
    assert list(per_layer.index) == [0, 50, 100, 150, 200] and list(per_layer.columns) == [0, 1]
    for metric in ("entropy_rank", "stable_rank", "alpha", "drift_first_rel_change"):
        assert (tmp_path / "plots" / f"trajectory_{metric}.png").stat().st_size > 0


def test_adding_a_checkpoint_costs_one_checkpoint(trained_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    ckpts = trained_run["checkpoints"]
    for c in ckpts[:-1]:
        shutil.copy(c, run)
    first = layerscope.trajectory([run])
    shutil.copy(ckpts[-1], run)
    second = layerscope.trajectory([run])
    alone = layerscope.analyze(ckpts[-1], store=str(tmp_path / "fresh.sqlite"))
    assert second.computed == alone.computed > 0  # only the new checkpoint's matrices
    assert second.cached == first.computed + first.cached + alone.cached


def test_trajectory_needs_two_checkpoints(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["trajectory", str(empty)]) == 2
    assert "no checkpoints found" in capsys.readouterr().err


def test_global_drift_against_the_checkpoint_files(trained_run):
    result = layerscope.trajectory([trained_run["dir"]])
    first = torch.load(trained_run["checkpoints"][0], weights_only=True)["model"]
    last = torch.load(trained_run["checkpoints"][-1], weights_only=True)["model"]
    names = [n for n, t in first.items() if t.dim() == 2 and n != "lm_head.weight"]  # lm_head is tied to wte
    num = sum(float((last[n].double() - first[n].double()).norm() ** 2) for n in names)
    den = sum(float(first[n].double().norm() ** 2) for n in names)
    assert result.summary()["drift_from_first"].iloc[-1] == pytest.approx(math.sqrt(num / den), rel=1e-9)


def test_an_unreadable_checkpoint_is_skipped_not_fatal(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for c in trained_run["checkpoints"][:3]:
        shutil.copy(c, run)
    good = (run / "ckpt_000100.pt").read_bytes()
    (run / "ckpt_000150.pt").write_bytes(good[: len(good) // 2])  # truncated while being written
    assert main(["trajectory", str(run)]) == 1
    captured = capsys.readouterr()
    assert "skipped unreadable checkpoint" in captured.out and "ckpt_000150" in captured.out
    result = layerscope.trajectory([run])
    assert [c.step for c in result.checkpoints] == [0, 50, 100] and len(result.skipped) == 1


def test_compare_and_run_bad_input_is_one_line(tmp_path, capsys):
    missing = str(tmp_path / "nope.safetensors")
    minilm = str(checkpoints.minilm_dir())
    for argv, words in ((["compare", missing, minilm], "no such file"), (["compare", minilm], "two checkpoints"),
                        (["compare", minilm, minilm, "--trim", "0"], "--trim"),
                        (["run", missing, "--out", str(tmp_path / "o")], "no such file"),
                        (["run", minilm, "--skip", "heads"], "--skip")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, (argv, err)


def test_spectral_deltas_of_two_different_checkpoints_are_b_minus_a(tmp_path):
    """delta_<metric> on two different models: the sign (B − A) and the row match are checked against
    each model's own analysis, and the stable rank against a direct float64 SVD of both matrices."""
    a = checkpoints.build_hf("llama", tmp_path / "a", seed=1)
    b = checkpoints.build_hf("llama", tmp_path / "b", seed=2)
    store = str(tmp_path / "s.sqlite")
    result = layerscope.compare(a, b, store=store)
    own_a = layerscope.analyze(a, store=store).table.set_index("name")
    own_b = layerscope.analyze(b, store=store).table.set_index("name")
    t = result.table.set_index("name")
    matrices = [n for n in t.index if own_a.loc[n, "stable_rank"] == own_a.loc[n, "stable_rank"]]  # non-NaN: matrices
    assert len(matrices) >= 14
    for name in matrices:
        for metric in ("stable_rank", "entropy_rank", "alpha", "spectral_norm"):
            expected = own_b.loc[name, metric] - own_a.loc[name, metric]
            assert t.loc[name, f"delta_{metric}"] == pytest.approx(expected, rel=1e-9, abs=1e-12), (name, metric)
        sa = np.linalg.svd(layerscope.open_source(a).load(name).double().numpy(), compute_uv=False)
        sb = np.linalg.svd(layerscope.open_source(b).load(name).double().numpy(), compute_uv=False)
        direct = (sb**2).sum() / sb[0] ** 2 - (sa**2).sum() / sa[0] ** 2
        assert t.loc[name, "delta_stable_rank"] == pytest.approx(direct, rel=1e-6, abs=1e-9)
    assert (t.loc[matrices, "delta_stable_rank"] != 0).all()  # different seeds: a formula giving 0 fails
