"""``layerscope probe`` and ``layerscope.probe``: real checkpoints end to end, small budgets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import checkpoints
import layerscope
from layerscope.cli import main

SMALL = ["--batches", "1", "--batch-size", "2", "--seq-len", "32", "--max-iter", "25", "--trace-samples", "8",
         "--density-runs", "1", "--density-steps", "8", "--blocks", "layer"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_probe_cli_on_trained_nanogpt(trained_run, tmp_path, capsys):
    ckpt = trained_run["checkpoints"][-1]
    out, plots = tmp_path / "p.json", tmp_path / "plots"
    assert main(["probe", ckpt, "--hessian", *SMALL, "--out", str(out), "--plot", str(plots)]) == 0
    text = capsys.readouterr().out
    assert "loss" in text and "Hessian top-5 eigenvalues" in text and "curvature per block" in text
    saved = json.loads(out.read_text())
    assert saved["kind"] == "causal" and saved["data"]["tokens"] == 64
    h = saved["hessian"]
    assert len(h["eigenvalues"]) == 5 and h["summary"]["hvps"] > 0
    eig = [e["eigenvalue"] for e in h["eigenvalues"]]
    assert eig == sorted(eig, reverse=True) and eig[0] > 0
    assert {b["block"] for b in h["blocks"]} == {"layer 0", "layer 1", "outside layers"}
    # the whole model's trace is the sum of the layer blocks' traces (the same Hutchinson samples)
    assert sum(b["trace"] for b in h["blocks"]) == pytest.approx(h["trace"]["estimate"], rel=1e-6)
    assert (plots / "hessian_density.png").stat().st_size > 10_000 and (plots / "hessian_layers.png").is_file()
    # the same probe again: everything from the store
    assert main(["probe", ckpt, "--hessian", *SMALL, "--out", str(out)]) == 0
    assert "everything else from the store" in capsys.readouterr().out
    assert json.loads(out.read_text())["hessian"]["eigenvalues"] == h["eigenvalues"]


def test_probe_cli_loss_only_on_tiny_hf_llama(arch_checkpoints, capsys):
    assert main(["probe", str(arch_checkpoints["llama"]), "--batches", "1", "--batch-size", "2", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "Hessian" not in out


@pytest.mark.parametrize("case", ["minilm", "missing-data", "bad-blocks", "out"])
def test_probe_cli_bad_input_is_one_line(case, trained_run, tmp_path, capsys):
    ckpt = trained_run["checkpoints"][-1]
    args = {"minilm": ["probe", str(checkpoints.minilm_dir())],
            "missing-data": ["probe", ckpt, "--data", str(tmp_path / "nope.txt")],
            "bad-blocks": ["probe", ckpt, "--hessian", "--blocks", "heads"],
            "out": ["probe", ckpt, "--out", str(tmp_path / "p.csv")]}[case]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("layerscope: error:")


def test_probe_api_live_module_against_exact_hessian(tmp_path):
    """A live module with its own loss: eigenvalues and trace against the exact float64 Hessian."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    X, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    result = layerscope.probe(net, [(X[:10], y[:10]), (X[10:], y[10:])], loss_fn=torch.nn.CrossEntropyLoss(),
                              hessian={"top_k": 3, "tol": 1e-10, "trace_min": 200, "trace_max": 200, "blocks": ()},
                              config=layerscope.Config(store=str(tmp_path / "s.sqlite")))
    params = list(net.parameters())
    sizes = [p.numel() for p in params]

    def f(theta):
        ps = [t.view(p.shape) for t, p in zip(theta.split(sizes), params)]
        out = torch.func.functional_call(net, {n: p for (n, _), p in zip(net.named_parameters(), ps)}, (X,))
        return torch.nn.functional.cross_entropy(out, y)

    H = torch.autograd.functional.hessian(f, torch.cat([p.detach().reshape(-1) for p in params])).numpy()
    exact = np.linalg.eigvalsh(H)
    np.testing.assert_allclose(result.hessian.eigenvalues["eigenvalue"], exact[::-1][:3], rtol=1e-6)
    assert result.hessian.bottom["eigenvalue"] == pytest.approx(exact[0], rel=1e-6, abs=1e-10)
    assert abs(result.hessian.trace.estimate - np.trace(H)) <= 3 * result.hessian.trace.std_error
    assert result.loss.loss == pytest.approx(float(f(torch.cat([p.detach().reshape(-1) for p in params]))), rel=1e-12)
    assert set(result.tables()) == {"parameters", "hessian_eigenvalues", "hessian_blocks"}


def test_run_has_a_probe_stage_or_says_why_not(trained_run, tmp_path, monkeypatch):
    from layerscope import run as run_module

    monkeypatch.setattr(run_module, "RUN_PROBE", dict(batches=1, batch_size=2, seq_len=32, hessian=dict(
        top_k=2, max_iter=15, trace_min=4, trace_max=4, density_runs=1, density_steps=6, blocks=("layer",), block_max_iter=5)))
    result = run_module.run(trained_run["checkpoints"][-1], out=tmp_path / "out", skip={"embeddings", "clusters"}, quiet=True)
    html = (tmp_path / "out" / "report.html").read_text()
    assert "On data: loss and curvature" in html and "Hessian spectral density" in html
    assert json.loads((tmp_path / "out" / "probe.json").read_text())["hessian"]["summary"]["top_eigenvalue"] > 0
    assert "probe" in result.stage_seconds
    notes: list[str] = []
    assert run_module.run_probe(checkpoints.minilm_dir(), None, layerscope.Config(), None, notes, lambda *a: None) is None
    assert len(notes) == 1 and "probe: skipped" in notes[0] and "language-model head" in notes[0]
