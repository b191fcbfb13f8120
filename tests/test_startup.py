"""Start-up cost: what the CLI imports before it does anything.

Run as real subprocesses (``python -X importtime -m layerscope ...``) so that the check sees exactly
what a user's shell sees, and fails as soon as someone adds a heavy import at the top of cli.py or
of a module it imports at start. Timings are in bench/bench_startup.py, never asserted here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import checkpoints

HEAVY_FOR_HELP = {"torch", "pandas", "numpy", "matplotlib", "sklearn", "scipy", "transformers", "numba", "pyarrow"}
HEAVY_FOR_INFO = {"matplotlib", "sklearn"}


def imported(*argv: str, tmp_path) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime -m layerscope ARGV``; the top-level packages it imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "layerscope", *argv], capture_output=True, text=True,
                          env={**os.environ, "LAYERSCOPE_CACHE_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}, timeout=300)
    names = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "layerscope.cli" in names, proc.stderr[-2000:]  # the importtime output was read
    return proc, {n.split(".")[0] for n in names}


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["analyze", "--help"], ["compare", "--help"]])
def test_help_and_version_import_nothing_heavy(argv, tmp_path):
    proc, packages = imported(*argv, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "layerscope" in proc.stdout
    assert not packages & HEAVY_FOR_HELP, sorted(packages & HEAVY_FOR_HELP)


def test_info_on_safetensors_imports_no_plotting_or_clustering(tmp_path):
    path = checkpoints.save_safetensors({"model.embed_tokens.weight": torch.randn(64, 16),
                                         "model.layers.0.mlp.down_proj.weight": torch.randn(16, 48)},
                                        tmp_path / "small.safetensors")
    proc, packages = imported("info", str(path), tmp_path=tmp_path)
    assert proc.returncode == 0 and "parameters" in proc.stdout, proc.stderr[-2000:]
    assert not packages & HEAVY_FOR_INFO, sorted(packages & HEAVY_FOR_INFO)


def test_bad_flag_is_rejected_before_the_heavy_imports(tmp_path):
    """A wrong --out suffix is found while parsing: one line, exit 2, torch never imported."""
    path = checkpoints.save_safetensors({"w": torch.randn(8, 8)}, tmp_path / "w.safetensors")
    proc, packages = imported("analyze", str(path), "--out", str(tmp_path / "res.xlsx"), tmp_path=tmp_path)
    err = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2 and len(err) == 1 and "--out" in err[0] and ".csv" in err[0], proc.stderr[-2000:]
    assert "torch" not in packages
    assert not list(tmp_path.glob("*.sqlite*"))  # no store was opened


LAZY_API = """
import sys, types
import layerscope
assert "torch" not in sys.modules and "pandas" not in sys.modules, "import layerscope pulled in the heavy stack"
import layerscope.weights.embeddings as m
assert isinstance(m, types.ModuleType) and m.__name__ == "layerscope.weights.embeddings"
assert isinstance(layerscope.embeddings, types.FunctionType) and layerscope.embeddings is m.embeddings
import layerscope.report as r, layerscope.run as rn
assert isinstance(layerscope.report, types.ModuleType) and layerscope.report is r and layerscope.run is rn
for name in layerscope.__all__:
    assert getattr(layerscope, name) is not None, name
    assert name in dir(layerscope), name
from layerscope import analyze, heads, clusters, compare, trajectory, Monitor, Config, register, LayerscopeError
assert analyze.__module__ == "layerscope.pipeline" and Monitor.__module__ == "layerscope.monitor.core"
try:
    layerscope.no_such_name
except AttributeError as exc:
    assert "no_such_name" in str(exc)
else:
    raise AssertionError("unknown attribute did not raise")
ns = {}
exec("from layerscope import *", ns)
assert set(layerscope.__all__) <= set(ns)
print("ok")
"""


def test_public_api_is_lazy_and_unchanged():
    proc = subprocess.run([sys.executable, "-c", LAZY_API], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
