"""Every metric agrees with an independent float64 NumPy reference on the same stored matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import checkpoints
import layerscope
from reference import reference_metrics, reference_stats, ww_alpha_loop
from layerscope.sources import open_source
from conftest import require

INTEGER = {"numerical_rank", "energy_rank_90", "energy_rank_98", "energy_rank_99"}
RTOL = 1e-4


def assert_row_matches(row, ref, label):
    for key, expected in ref.items():
        got = row[key]
        if key in INTEGER:
            assert int(got) == expected, f"{label}: {key} {got} != {expected}"
        elif math.isinf(expected):
            assert math.isinf(got), f"{label}: {key} {got} != inf"
        else:
            assert got == pytest.approx(expected, rel=RTOL, abs=1e-12), f"{label}: {key} {got} != {expected}"


@pytest.fixture(scope="module")
def minilm_result(tmp_path_factory):
    return layerscope.analyze(checkpoints.minilm_dir(), store=str(tmp_path_factory.mktemp("s") / "r.sqlite"))


def test_minilm_every_matrix_matches_float64_svd(minilm_result):
    source = open_source(checkpoints.minilm_dir())
    table = minilm_result.table.set_index("name")
    checked = 0
    for name, info in source.infos.items():
        if len(info.shape) != 2 or not info.dtype.startswith("float") or min(info.shape) < 2:
            continue
        w = source.load(name).numpy().astype(np.float64)
        assert_row_matches(table.loc[name], reference_metrics(w), name)
        assert_row_matches(table.loc[name], reference_stats(w), name)
        checked += 1
    assert checked >= 38  # 36 layer matrices, pooler, 3 embeddings (incl. the 30522-row vocabulary)


def test_minilm_stats_of_vectors(minilm_result):
    source = open_source(checkpoints.minilm_dir())
    table = minilm_result.table.set_index("name")
    for name in ("embeddings.LayerNorm.weight", "encoder.layer.0.attention.self.query.bias"):
        assert_row_matches(table.loc[name], reference_stats(source.load(name).numpy()), name)
        assert math.isnan(table.loc[name, "spectral_norm"])
        assert table.loc[name, "error"] == ""


def test_known_spectra_including_ill_conditioned_and_rank_deficient(tmp_path):
    path, arrays = checkpoints.write_low_rank_safetensors(tmp_path / "m.safetensors")
    rng = np.random.default_rng(1)
    extra = {
        # exactly rank-deficient even in float32: duplicated columns and a zero row
        "dup.weight": np.repeat(rng.standard_normal((64, 12)).astype(np.float32), 3, axis=1),
        # float64 storage keeps an exact rank of 7
        "rank7_f64.weight": rng.standard_normal((70, 7)) @ rng.standard_normal((7, 50)),
        # κ = 1e5: just past the float64 Gram route's limit
        "kappa1e5.weight": (np.linalg.qr(rng.standard_normal((40, 40)))[0] * np.logspace(0, -5, 40)).astype(np.float32),
    }
    extra["dup.weight"][5] = 0
    tensors = {**{k: torch.from_numpy(v.astype(np.float32)) for k, v in arrays.items()},
               **{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in extra.items()}}
    checkpoints.save_safetensors(tensors, tmp_path / "all.safetensors")
    result = layerscope.analyze(tmp_path / "all.safetensors", store=str(tmp_path / "s.sqlite"))
    table = result.table.set_index("name")
    for name, t in tensors.items():
        assert_row_matches(table.loc[name], reference_metrics(t.numpy().astype(np.float64)), name)
    assert table.loc["dup.weight", "numerical_rank"] == 12
    assert table.loc["rank7_f64.weight", "numerical_rank"] == 7
    assert table.loc["illcond.weight", "condition_number"] > 1e6


def test_float32_mode_keeps_large_singular_values(tmp_path):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((300, 120)).astype(np.float32)
    checkpoints.save_safetensors({"w.weight": torch.from_numpy(w)}, tmp_path / "w.safetensors")
    row = layerscope.analyze(tmp_path / "w.safetensors", store=str(tmp_path / "s.sqlite"), dtype="float32").table.iloc[0]
    ref = reference_metrics(w.astype(np.float64))
    for key in ("spectral_norm", "stable_rank", "entropy_rank", "log_norm"):
        assert row[key] == pytest.approx(ref[key], rel=1e-4)


def test_alpha_matches_weightwatcher_code_when_installed():
    ww_powerlaw = require("weightwatcher.WW_powerlaw")
    rng = np.random.default_rng(3)
    for shape in ((200, 100), (384, 384), (1000, 64), (30, 12)):  # (30, 12): the small-n variant
        w = rng.standard_t(df=3, size=shape)  # heavy-tailed entries give a heavy-tailed ESD
        evals = np.linalg.svd(w, compute_uv=False) ** 2
        fit = ww_powerlaw.WWFit(evals[evals > 1e-5])
        from layerscope.weights.metrics.powerlaw import fit_powerlaw

        assert fit_powerlaw(evals).alpha == pytest.approx(fit.alpha, rel=1e-9)
        if len(evals) >= 20:
            assert ww_alpha_loop(evals) == pytest.approx(fit.alpha, rel=1e-9)
