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
