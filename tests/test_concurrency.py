"""Two ``layerscope analyze`` processes on the same store at once: both finish, one copy of each result."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import torch

import checkpoints
import layerscope


def _rows(store: Path, table: str) -> list[tuple]:
    with sqlite3.connect(store) as db:
        return sorted(db.execute(f"SELECT * FROM {table}").fetchall(), key=repr)


def test_two_processes_on_one_store(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.mlp.weight": torch.randn(160, 96, generator=g) for i in range(10)}
    tensors["shared.weight"] = tensors["layers.0.mlp.weight"].clone()  # same content: one result
    path = checkpoints.save_safetensors(tensors, tmp_path / "w.safetensors")
    store = tmp_path / "shared.sqlite"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(layerscope.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "layerscope", "analyze", str(path), "--store", str(store), "--quiet", "--workers", "1"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "Traceback" not in err and "locked" not in err
    with sqlite3.connect(store) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        dup = db.execute("SELECT COUNT(*) FROM (SELECT content_hash, metric, params FROM results "
                         "GROUP BY 1, 2, 3 HAVING COUNT(*) > 1)").fetchone()[0]
        assert dup == 0
    # the shared store holds exactly what one process alone stores: one copy of each result
    alone = tmp_path / "alone.sqlite"
    layerscope.analyze(path, store=str(alone), workers=1)
    for table in ("results", "spectra"):
        assert len(_rows(store, table)) == len(_rows(alone, table)), table
    assert {r[:3] for r in _rows(store, "results")} == {r[:3] for r in _rows(alone, "results")}
    again = layerscope.analyze(path, store=str(store))
    assert again.computed == 0


def test_pool_workers_run_at_their_share_of_the_cores(tmp_path, monkeypatch):
    """Every pool worker runs at its share of the cores (cores // workers) from its first tensor on,
    and the caller's count is restored afterwards (issue 16). torch's intra-op count is per thread:
    the pool's initializer ``set_worker_threads`` (the monitor's worker uses it too) sets it; torch
    2.13 also gives a thread created after ``set_num_threads`` that count on first use, so this
    checks the outcome, whichever of the two provides it."""
    import threading

    import pytest

    import layerscope.pipeline as pipeline

    cores = os.cpu_count() or 1
    if cores < 2:
        pytest.skip("one core: every share is the default count")
    seen = []
    real = pipeline.moments

    def spy(tensor):  # the first thing a worker computes on a tensor, before any spectrum
        seen.append((threading.get_ident(), torch.get_num_threads()))
        return real(tensor)

    monkeypatch.setattr(pipeline, "moments", spy)
    g = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.mlp.weight": torch.randn(64, 48, generator=g) for i in range(6)}
    path = checkpoints.save_safetensors(tensors, tmp_path / "w.safetensors")
    before = torch.get_num_threads()
    layerscope.analyze(path, store=str(tmp_path / "s.sqlite"), workers=2)
    share = max(1, cores // 2)
    assert len(seen) == 6 and len({ident for ident, _ in seen} - {threading.get_ident()}) >= 1
    # all but the last tensor in flight (which may get the idle worker's cores) run at the share
    assert sorted(count for _, count in seen)[:5] == [share] * 5, seen
    assert torch.get_num_threads() == before
