"""The untrusted-bytes parsers hold their contract (tests/fuzz/targets.py): a one-line
LayerscopeError or success — never a traceback, a hang or an allocation larger than the file.

Every committed seed and every regression input (crashes found by fuzzing, since fixed) is
replayed; then each target gets a short coverage-guided atheris run (a bounded number of
iterations, seconds each) in its own process. Long runs: scripts/fuzz.sh.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "fuzz"))

from targets import REGRESSIONS, TARGETS, seeds  # noqa: E402

CI_RUNS = 400  # iterations per target in CI
CI_SECONDS = 6  # and at most this long


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seed_corpus_and_regressions_hold_the_contract(name):
    inputs = seeds(name)
    assert inputs, f"no seed corpus for {name}"
    for path in inputs:
        TARGETS[name](path.read_bytes())


def test_regressions_are_the_crashes_found():
    """The torch pickle loader's corrupt-input exceptions (AssertionError, KeyError, IndexError,
    TypeError, AttributeError from torch's legacy loader) are one-line errors, and a 364-byte legacy
    pickle declaring 16 GB of storage is refused before torch allocates it."""
    found = sorted(p.name for p in (REGRESSIONS / "torch_pickle").iterdir())
    assert len(found) >= 6
    from layerscope.errors import LayerscopeError
    from layerscope.sources.torch_file import load_pickle

    for p in (REGRESSIONS / "torch_pickle").iterdir():
        with pytest.raises(LayerscopeError) as info:
            load_pickle(p)
        assert "\n" not in str(info.value) and "PyTorch checkpoint" in str(info.value)
    with pytest.raises(LayerscopeError, match="declares 16000000000 bytes of tensor data in a 364-byte file"):
        load_pickle(REGRESSIONS / "torch_pickle" / "legacy_huge_storage.bin")
    # trainer_state.json with global_step 1e999 (inf) once raised OverflowError

    for p in (REGRESSIONS / "trainer_state").iterdir():
        TARGETS["trainer_state"](p.read_bytes())


def test_data_reader_regressions_are_the_crashes_found(tmp_path):
    """The probes' data readers: a .jsonl line that is not UTF-8 (UnicodeDecodeError from the file
    iteration), a .jsonl line nested 5000 deep (RecursionError from json.loads), a .jsonl text with a
    lone surrogate escape "\\ude42" (json.loads accepts it; UnicodeEncodeError in the tokenizer) and a
    Parquet string column holding non-UTF-8 bytes (UnicodeDecodeError from pyarrow's conversion) each
    raised a traceback; now each is one line naming the file and the line, field or column."""
    import shutil

    from layerscope.errors import LayerscopeError
    from layerscope.probes.data import read_texts

    expected = {"not_utf8_line.jsonl": "line 1 is not UTF-8 text", "nested_5000_deep.jsonl": "line 1 is not JSON",
                "lone_surrogate_escape.jsonl": "field 'text' is not valid Unicode text (a lone surrogate escape)",
                "string_column_not_utf8.parquet": "column 'text' holds bytes that are not UTF-8 text"}
    for name, message in expected.items():
        found = REGRESSIONS / ("data_parquet" if name.endswith(".parquet") else "data_jsonl") / name
        path = tmp_path / ("data" + found.suffix)
        shutil.copy(found, path)
        with pytest.raises(LayerscopeError) as info:
            read_texts(path)
        where = f"{path} line 1" if "field" in message else str(path)
        assert str(info.value) == f"--data {where}: {message}"
    # a datasets folder whose Arrow file has string offsets past its data: memory-mapped and read
    # unchecked, it killed the process (SIGBUS); now the table is validated first
    from targets import small_dataset_files

    folder = tmp_path / "ds"
    folder.mkdir()
    for name, content in small_dataset_files().items():
        bad = REGRESSIONS / "data_datasets" / "string_offsets_past_the_data.arrow"
        (folder / name).write_bytes(bad.read_bytes() if name.endswith(".arrow") else content)
    with pytest.raises(LayerscopeError, match=r"the dataset's Arrow data is corrupt: .*offsets") as info:
        read_texts(folder)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_bounded_fuzzing_run(name, tmp_path):
    pytest.importorskip("atheris")
    new_inputs = tmp_path / "new"
    new_inputs.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "fuzz" / "fuzz.py"), name, f"-runs={CI_RUNS}", f"-max_total_time={CI_SECONDS}",
         "-timeout=20", "-rss_limit_mb=3072", f"-artifact_prefix={tmp_path}/", "-seed=1",
         str(new_inputs), str(HERE / "fuzz" / "corpus" / name)],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done" in proc.stderr
