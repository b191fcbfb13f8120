"""Bad input: one clear line, exit status 2, no traceback; per-tensor trouble stays in its row."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import checkpoints
import layerscope
from layerscope.cli import main
from layerscope.errors import LayerscopeError


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("layerscope: error:")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_path(capsys, tmp_path):
    code, _, err = run_cli(capsys, "analyze", str(tmp_path / "nope.safetensors"))
    assert_one_line_error(code, err, "nope.safetensors", "no such file")


def test_folder_without_weights(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    code, _, err = run_cli(capsys, "info", str(tmp_path))
    assert_one_line_error(code, err, str(tmp_path), "no weights found")


@pytest.mark.parametrize("writer,fragment", [
    (checkpoints.write_truncated_safetensors, "truncated"),
    (checkpoints.write_header_too_long, "larger than the file"),
    (checkpoints.write_header_not_json, "not valid JSON"),
    (checkpoints.write_bad_byte_length, "bytes but shape"),
])
def test_corrupt_safetensors(capsys, tmp_path, writer, fragment):
    path = writer(tmp_path / "bad.safetensors")
    code, _, err = run_cli(capsys, "analyze", str(path))
    assert_one_line_error(code, err, "bad.safetensors", fragment)


@pytest.mark.parametrize("container", ["zip", "legacy", "raw"])
def test_malicious_pickle_is_refused_never_executed(capsys, tmp_path, container):
    marker = tmp_path / "pwned"
    path = checkpoints.write_malicious_pickle(tmp_path / "evil.bin", marker, container=container)
    code, _, err = run_cli(capsys, "analyze", str(path))
    assert_one_line_error(code, err, "evil.bin")
    assert "refused" in err or "cannot read" in err
    assert not marker.exists()


def test_unknown_metric(capsys, tmp_path):
    path = checkpoints.write_low_rank_safetensors(tmp_path / "m.safetensors")[0]
    code, _, err = run_cli(capsys, "analyze", str(path), "--metrics", "alpha,bogus_metric")
    assert_one_line_error(code, err, "bogus_metric")


def test_unknown_config_key(capsys, tmp_path):
    path = checkpoints.write_low_rank_safetensors(tmp_path / "m.safetensors")[0]
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("workers: 1\nmetrcs: [alpha]\n")
    code, _, err = run_cli(capsys, "analyze", str(path), "--config", str(cfg))
    assert_one_line_error(code, err, "metrcs")


def test_bad_output_suffix(capsys, tmp_path):
    path = checkpoints.write_low_rank_safetensors(tmp_path / "m.safetensors")[0]
    code, _, err = run_cli(capsys, "analyze", str(path), "--out", str(tmp_path / "x.xlsx"), "--quiet")
    assert_one_line_error(code, err, ".csv")


def test_troubled_tensors_are_recorded_in_their_rows(tmp_path, capsys):
    path = checkpoints.write_troubled_safetensors(tmp_path / "t.safetensors")
    code, out, err = run_cli(capsys, "analyze", str(path), "--out", str(tmp_path / "t.csv"))
    assert code == 0 and "Traceback" not in err
    import pandas as pd

    t = pd.read_csv(tmp_path / "t.csv", keep_default_na=False, na_values=[""]).set_index("name")
    assert t.loc["good.weight", "error"] == "" or pd.isna(t.loc["good.weight", "error"])
    assert t.loc["good.weight", "spectral_norm"] > 0
    expectations = {"nan.weight": "NaN", "inf.weight": "Inf", "zero.weight": "all-zero", "empty.weight": "empty",
                    "row.weight": "degenerate", "int.weight": "int64"}
    for name, fragment in expectations.items():
        assert fragment in t.loc[name, "error"], (name, t.loc[name, "error"])
        assert math.isnan(t.loc[name, "spectral_norm"]), name
    assert t.loc["nan.weight", "nan_count"] == 2 and t.loc["inf.weight", "inf_count"] == 1
    assert t.loc["int.weight", "max"] == 15  # statistics still computed for integer tensors
    assert math.isnan(t.loc["vec.bias", "spectral_norm"]) and pd.isna(t.loc["vec.bias", "error"])


def test_file_truncated_after_opening_marks_only_the_lost_tensor(tmp_path):
    tensors = {"a.weight": torch.randn(32, 16), "b.weight": torch.randn(16, 16)}
    path = checkpoints.save_safetensors(tensors, tmp_path / "w.safetensors")
    source = layerscope.open_source(path)  # header validated while the file was whole
    header = checkpoints.read_safetensors_header(path)
    data = path.read_bytes()
    data_start = 8 + int.from_bytes(data[:8], "little")
    last = max(header.items(), key=lambda kv: kv[1]["data_offsets"][0] if kv[0] != "__metadata__" else -1)[0]
    path.write_bytes(data[: data_start + header[last]["data_offsets"][0]])  # lose the last tensor's bytes
    result = layerscope.analyze(source, store=str(tmp_path / "s.sqlite"))
    t = result.table.set_index("name")
    assert result.unreadable == [last] and result.exit_code == 1
    assert "truncated" in t.loc[last, "error"]
    survivor = ({"a.weight", "b.weight"} - {last}).pop()
    assert t.loc[survivor, "spectral_norm"] > 0 and t.loc[survivor, "error"] == ""


def test_one_unreadable_tensor_does_not_stop_the_others(tmp_path):
    tensors = {"a.weight": torch.randn(32, 16), "b.weight": torch.randn(16, 16)}
    path = checkpoints.save_safetensors(tensors, tmp_path / "w.safetensors")
    source = layerscope.open_source(path)
    original = source.load

    def flaky(name):
        if name == "a.weight":
            raise OSError("device went away")
        return original(name)

    source.load = flaky
    result = layerscope.analyze(source, store=str(tmp_path / "s.sqlite"))
    t = result.table.set_index("name")
    assert result.unreadable == ["a.weight"] and result.exit_code == 1
    assert "device went away" in t.loc["a.weight", "error"]
    assert t.loc["b.weight", "spectral_norm"] > 0


def test_real_entry_point_prints_no_traceback(tmp_path):
    bad = checkpoints.write_header_not_json(tmp_path / "bad.safetensors")
    proc = subprocess.run([sys.executable, "-m", "layerscope", "analyze", str(bad)], capture_output=True, text=True,
                          env={**os.environ, "LAYERSCOPE_CACHE_DIR": str(tmp_path)})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_python_api_raises_one_exception_type(tmp_path):
    with pytest.raises(LayerscopeError, match="no such file"):
        layerscope.analyze(tmp_path / "missing")
    with pytest.raises(LayerscopeError, match="unknown config key"):
        layerscope.analyze(tmp_path, wrkers=2)


def test_failing_decomposition_costs_only_that_matrix(tmp_path, monkeypatch):
    path = checkpoints.save_safetensors({"a.weight": torch.randn(32, 16), "b.weight": torch.randn(24, 12)},
                                        tmp_path / "w.safetensors")
    import layerscope.pipeline as pipeline

    real = pipeline.singular_values

    def failing(matrix, *args, **kwargs):
        if matrix.shape[0] == 32:
            raise torch.linalg.LinAlgError("eigvalsh: the algorithm failed to converge")
        return real(matrix, *args, **kwargs)

    monkeypatch.setattr(pipeline, "singular_values", failing)
    result = layerscope.analyze(path, store=str(tmp_path / "s.sqlite"))
    t = result.table.set_index("name")
    assert "spectrum failed" in t.loc["a.weight", "error"] and math.isnan(t.loc["a.weight", "alpha"])
    assert t.loc["a.weight", "std"] > 0 and t.loc["b.weight", "alpha"] > 0 and result.exit_code == 0
    monkeypatch.setattr(pipeline, "singular_values", real)
    again = layerscope.analyze(path, store=str(tmp_path / "s.sqlite")).table.set_index("name")
    assert again.loc["a.weight", "alpha"] > 0 and again.loc["a.weight", "error"] == ""  # the failure was not cached


def test_internal_error_is_exit_3_in_one_line(tmp_path, capsys, monkeypatch):
    """A bug of ours (any exception that is not LayerscopeError) exits 3 with one line; the traceback
    only with LAYERSCOPE_DEBUG=1. The command is replaced by one that fails: main's mapping is under test."""
    from layerscope import cli

    def broken(args, console):
        raise ZeroDivisionError("division by zero in a command")

    monkeypatch.setitem(cli.COMMANDS, "info", broken)
    monkeypatch.delenv("LAYERSCOPE_DEBUG", raising=False)
    path = checkpoints.save_safetensors({"a.weight": torch.randn(4, 4)}, tmp_path / "w.safetensors")
    assert main(["info", str(path)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: ZeroDivisionError" in err and "LAYERSCOPE_DEBUG" in err
    monkeypatch.setenv("LAYERSCOPE_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["info", str(path)])
