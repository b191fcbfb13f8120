"""The result store: re-runs recompute nothing, shared tensors are reused, interrupted runs resume."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

import checkpoints
import layerscope


def _same_results(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_exact=False, rtol=1e-12)


def test_rerun_recomputes_nothing(tmp_path):
    path = checkpoints.build_hf("llama", tmp_path / "llama")
    store = str(tmp_path / "s.sqlite")
    first = layerscope.analyze(path, store=store, workers=1)  # one worker: two identical tensors are never in flight at once
    second = layerscope.analyze(path, store=store)
    # identical tensors (the all-ones norms of a fresh model) are computed once even in the first run:
    # exactly as many computations as distinct (bytes, shape, dtype) contents, counted here with hashlib
    src = layerscope.open_source(path)
    distinct = {hashlib.sha256(src.load(n).numpy().tobytes() + str((src.load(n).shape, src.load(n).dtype)).encode()).hexdigest()
                for n in first.table["name"]}
    assert len(distinct) < len(first.table)  # the fixture really has repeated contents
    assert first.computed == len(distinct) and first.computed + first.cached == len(first.table)
    assert second.computed == 0 and second.cached == len(first.table)
    _same_results(first.table, second.table)


def test_second_checkpoint_recomputes_only_changed_tensors(tmp_path):
    base = checkpoints.build_hf("phi3", tmp_path / "base")
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    tensors = {n: layerscope.open_source(base).load(n).clone() for n in layerscope.open_source(base).names()}
    changed = "model.layers.1.self_attn.qkv_proj.weight"
    tensors[changed] += 0.01
    checkpoints.save_safetensors(tensors, tuned / "model.safetensors")
    (tuned / "config.json").write_text((base / "config.json").read_text())
    store = str(tmp_path / "s.sqlite")
    layerscope.analyze(base, store=store)
    second = layerscope.analyze(tuned, store=store)
    assert second.computed == 4  # the fused matrix and its q, k, v slices
    assert second.cached == len(second.table) - 4


def test_no_cache_recomputes(tmp_path):
    path = checkpoints.build_hf("gpt2", tmp_path / "gpt2")
    store = str(tmp_path / "s.sqlite")
    layerscope.analyze(path, store=store)
    again = layerscope.analyze(path, store=store, cache=False)
    assert again.cached == 0 and again.computed == len(again.table)  # --no-cache: nothing read from the store


def test_new_metric_parameters_are_a_new_key(tmp_path):
    path = checkpoints.write_low_rank_safetensors(tmp_path / "m.safetensors")[0]
    store = str(tmp_path / "s.sqlite")
    a = layerscope.analyze(path, store=store)
    b = layerscope.analyze(path, store=store, energy_levels=(0.5, 0.9))
    assert "energy_rank_50" in b.table.columns and b.computed == len(b.table)
    pd.testing.assert_series_equal(a.table["energy_rank_90"], b.table["energy_rank_90"])


def _big_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(700, 700, generator=g) for i in range(24)}
    return checkpoints.save_safetensors(tensors, tmp_path / "big.safetensors")


def _stored_rows(store):
    if not os.path.exists(store):
        return 0
    try:
        with sqlite3.connect(store, timeout=1) as db:
            return db.execute("SELECT COUNT(DISTINCT content_hash) FROM results").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_killed_run_leaves_a_readable_store_and_resumes(tmp_path, sig):
    path = _big_checkpoint(tmp_path)
    store = str(tmp_path / "s.sqlite")
    cmd = [sys.executable, "-m", "layerscope", "analyze", str(path), "--store", store, "--quiet", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while _stored_rows(store) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    done = _stored_rows(store)
    assert 3 <= done < 24, "the run should have been stopped part-way"
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    with sqlite3.connect(store) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    resumed = layerscope.analyze(path, store=store)
    assert resumed.cached >= done and resumed.computed == 24 - resumed.cached
    assert resumed.table["spectral_norm"].notna().all()
