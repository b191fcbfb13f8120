"""Every argument is checked before any work: a bad flag costs a second, not an analysis.

Each case must exit with status 2 and one line naming the flag, before the store is opened (the
per-test store folder stays empty) and before any output is written.
"""

from __future__ import annotations

import time

import pytest
import checkpoints
from layerscope.cli import main


@pytest.fixture()
def small(tmp_path):
    """A small llama-shaped checkpoint written by transformers (analysed in seconds, if it ever were)."""
    return checkpoints.build_hf("llama", tmp_path / "llama")


def cases(ckpt: str, tmp: str) -> list[tuple[list[str], str]]:
    tmp_file = f"{tmp}/a-file.txt"
    open(tmp_file, "w").close()
    return [
        (["analyze", ckpt, "--out", f"{tmp}/res.xlsx"], "--out"),
        (["analyze", ckpt, "--out", f"{tmp_file}/res.csv"], "not a directory"),
        (["analyze", ckpt, "--workers", "-1"], "--workers"),
        (["analyze", ckpt, "--device", "tpu"], "--device"),
        (["analyze", ckpt, "--metrics", "alpha,bogus"], "bogus"),
        (["analyze", ckpt, "--plot", tmp_file], "--plot"),
        (["analyze", ckpt, "--store", tmp], "--store"),
        (["analyze", ckpt, "--config", f"{tmp}/missing.toml"], "--config"),
        (["heads", ckpt, "--out", f"{tmp}/h.xlsx"], "--out"),
        (["heads", ckpt, "--select", "1-2"], "--select"),
        (["embeddings", ckpt, "--out", f"{tmp}/e.csv"], "--out"),
        (["embeddings", ckpt, "--range", "1,0"], "--range"),
        (["embeddings", ckpt, "--bins", "0"], "--bins"),
        (["embeddings", ckpt, "--sample", "1"], "--sample"),
        (["embeddings", ckpt, "--max-memory", "12XB"], "--max-memory"),
        (["embeddings", ckpt, "--threshold", "2"], "--threshold"),
        (["clusters", ckpt, "--k-range", "9..3"], "--k-range"),
        (["clusters", ckpt, "--k-values", "1,2"], "--k-values"),
        (["clusters", ckpt, "--out", f"{tmp}/c.parquet"], "--out"),
        (["compare", ckpt, ckpt, "--out", f"{tmp}/d.xlsx"], "--out"),
        (["compare", ckpt, ckpt, "--trim", "0"], "--trim"),
        (["compare", ckpt, ckpt, "--top-k", "-3"], "--top-k"),
        (["compare", ckpt], "two checkpoints"),
        (["compare", ckpt, f"{tmp}/missing.safetensors"], "missing.safetensors"),
        (["trajectory", ckpt, ckpt, "--out", f"{tmp}/t.xlsx"], "--out"),
        (["trajectory", ckpt, ckpt, "--plot", f"{tmp}/p", "--plot-metrics", "entropy_rank,nope"], "--plot-metrics"),
        (["trajectory", ckpt, ckpt, "--metrics", "nope"], "nope"),
        (["report", ckpt, f"{tmp}/second-is-missing.safetensors"], "second-is-missing"),
        (["report", ckpt, "--out", f"{tmp}/r.pdf"], "--out"),
        (["report", ckpt, "--md", f"{tmp}/r.txt"], "--md"),
        (["run", ckpt, "--skip", "heads"], "--skip"),
        (["run", ckpt, "--out", tmp_file], "--out"),
        (["info", "model.safetensors"], "no such file"),
    ]


def test_every_bad_argument_is_one_line_before_any_work(small, tmp_path, capsys, _layerscope_cache_dir):
    tmp = tmp_path / "work"
    tmp.mkdir()
    for argv, fragment in cases(str(small), str(tmp)):
        started = time.perf_counter()
        code = main(argv)
        seconds = time.perf_counter() - started
        out, err = capsys.readouterr()
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, (argv, err)
        assert lines[0].startswith("layerscope: error:") and fragment in lines[0], (argv, lines[0])
        assert "Traceback" not in err and not out, argv
        assert not list(_layerscope_cache_dir.iterdir()), f"{argv}: the store was opened"
        assert sorted(p.name for p in tmp.iterdir()) == ["a-file.txt"], f"{argv}: something was written"
        assert seconds < 60, argv  # generous: a guard against running the analysis, not a timing claim


def test_good_arguments_still_run(small, tmp_path, capsys):
    """The checks do not reject what is valid: a full command with many flags runs."""
    out = tmp_path / "deep" / "er" / "t.parquet"
    assert main(["analyze", str(small), "--out", str(out), "--workers", "0", "--device", "cpu", "--metrics",
                 "stats,alpha", "--quiet", "--store", str(tmp_path / "s" / "store.sqlite")]) == 0
    assert out.is_file()
    assert main(["heads", str(small), "--select", "0.1,1.0",
                 "--store", str(tmp_path / "s" / "store.sqlite")]) == 0
    capsys.readouterr()


def test_help_and_version_return_zero(capsys):
    assert main(["--help"]) == 0 and "analyze" in capsys.readouterr().out
    assert main(["--version"]) == 0 and "layerscope" in capsys.readouterr().out
    assert main(["nonsense"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("layerscope: error:")
