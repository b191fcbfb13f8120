"""Fuzz targets: every parser that reads untrusted bytes, each a function of the raw bytes.

The contract every target checks (``check``): the bytes either parse, or the parser raises one
``LayerscopeError`` whose message is one line (the CLI prints it and exits 2). Anything else — any
other exception (a traceback), a hang (the fuzzer's ``-timeout``), or a tensor allocation larger
than the file that was read — is a crash. The targets drive the real code paths, from the file on
disk through ``open_source`` to reading every tensor and building the anatomy, as ``analyze`` does.

Used by ``fuzz.py`` (atheris, coverage-guided), by tests/test_fuzz.py (the committed seed corpus,
the regression inputs, and a bounded atheris run per target in CI) and by scripts/fuzz.sh.

The probes' data readers (src/layerscope/probes/data.py: a text file, ``.jsonl``, ``.parquet``, a
``datasets`` save_to_disk folder) have one target each (``data_*``): the bytes go where ``--data``
points, ``read_texts`` reads them as the CLI does, the documents may not hold more characters than
the file has bytes (text and JSON Lines; Parquet and Arrow are compressed, so for them the bound is
the fuzzer's ``-rss_limit_mb``), and they are packed into token windows (``make_batches``, byte
tokenizer) so the whole path to the tensors the probes run on is covered. Adding a target: one
``target_*`` function, one TARGETS entry, seeds under tests/fuzz/corpus/<name>/ (make_corpus.py);
test_fuzz.py and scripts/fuzz.sh run every registered target.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

#: A tensor read from a file may not take more bytes than the file holds.
ALLOCATION_SLACK = 0


class ContractViolation(AssertionError):
    """The parser broke the bad-input contract (reported by the fuzzer as a crash)."""


@contextmanager
def _workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="layerscope-fuzz-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _one_line(exc: Exception) -> None:
    text = str(exc)
    if "\n" in text or not text.strip():
        raise ContractViolation(f"error message is not one non-empty line: {text!r}")


def _read_everything(target: Path, files_bytes: int) -> None:
    """What analyze does with a checkpoint before any maths: open, anatomy, read each tensor."""
    from layerscope.anatomy import build_anatomy
    from layerscope.errors import LayerscopeError
    from layerscope.sources import open_source

    src = open_source(target)
    build_anatomy(src.infos, src.config)
    for name in list(src.names())[:64]:
        try:
            tensor = src.load(name)
        except LayerscopeError as exc:  # one unreadable tensor: its row says why, the rest go on
            _one_line(exc)
            continue
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > files_bytes + ALLOCATION_SLACK:
            raise ContractViolation(f"{name}: a {nbytes}-byte tensor from {files_bytes} bytes of files")


def check(run: Callable[[], None]) -> None:
    """Run a parse; only a one-line LayerscopeError may come out of it."""
    from layerscope.errors import LayerscopeError

    try:
        run()
    except LayerscopeError as exc:
        _one_line(exc)


def _files_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# -- valid companions the targets put the fuzzed bytes beside ----------------------------------
def small_safetensors_bytes() -> bytes:
    """A tiny valid Llama-named safetensors file (the companion of the config/index/state targets)."""
    import torch
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    t = {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(4, 8, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(8, 12, generator=g),
        "model.norm.weight": torch.ones(8),
    }
    return save(t)


_COMPANION: bytes | None = None


def _companion() -> bytes:
    global _COMPANION
    if _COMPANION is None:
        _COMPANION = small_safetensors_bytes()
    return _COMPANION


# -- the targets ----------------------------------------------------------------------------------
def target_safetensors(data: bytes) -> None:
    """The safetensors header (length prefix, JSON, dtypes, shapes, data offsets) and tensor reads."""
    with _workdir() as d:
        path = d / "model.safetensors"
        path.write_bytes(data)
        check(lambda: _read_everything(path, len(data)))


def target_shard_index(data: bytes) -> None:
    """``model.safetensors.index.json`` beside one real shard."""
    with _workdir() as d:
        (d / "model-00001-of-00001.safetensors").write_bytes(_companion())
        (d / "model.safetensors.index.json").write_bytes(data)
        check(lambda: _read_everything(d, _files_bytes(d)))


def target_config_json(data: bytes) -> None:
    """``config.json`` (dims, heads, vocab, tie_word_embeddings ...) read into the anatomy."""
    with _workdir() as d:
        (d / "model.safetensors").write_bytes(_companion())
        (d / "config.json").write_bytes(data)
        check(lambda: _read_everything(d, _files_bytes(d)))


def target_trainer_state(data: bytes) -> None:
    """``trainer_state.json`` (the step of an HF Trainer checkpoint) as trajectory reads it."""
    from layerscope.change.trajectory import _step_of

    with _workdir() as d:
        (d / "model.safetensors").write_bytes(_companion())
        (d / "trainer_state.json").write_bytes(data)
        check(lambda: _step_of(d))


def target_torch_pickle(data: bytes) -> None:
    """A nanoGPT ``ckpt.pt`` / ``pytorch_model.bin``: torch.load(weights_only=True), the state dict
    search, metadata (iter_num, model_args), and every tensor read."""
    with _workdir() as d:
        path = d / "ckpt.pt"
        path.write_bytes(data)
        check(lambda: _read_everything(path, len(data)))


def _read_data(path: Path, size_bound: int | None) -> None:
    """What every probe does with ``--data PATH`` before the model runs: read the texts, pack windows."""
    from layerscope.probes.data import byte_tokenizer, make_batches, read_texts

    docs, description = read_texts(path)
    if size_bound is not None and sum(len(d) for d in docs) > size_bound:
        raise ContractViolation(f"{sum(len(d) for d in docs)} characters of documents from {size_bound} bytes")
    make_batches(docs, byte_tokenizer(), kind="causal", seq_len=8, batches=1, batch_size=2, vocab_size=256,
                 description=description)


def target_data_text(data: bytes) -> None:
    """``--data notes.txt``: a UTF-8 text file (any suffix but .jsonl/.parquet)."""
    with _workdir() as d:
        path = d / "data.txt"
        path.write_bytes(data)
        check(lambda: _read_data(path, len(data)))


def target_data_jsonl(data: bytes) -> None:
    """``--data docs.jsonl``: one JSON object per line, the text in field ``text``."""
    with _workdir() as d:
        path = d / "data.jsonl"
        path.write_bytes(data)
        check(lambda: _read_data(path, len(data)))


def target_data_parquet(data: bytes) -> None:
    """``--data docs.parquet``: a Parquet file with a string column ``text`` (read by pandas/pyarrow)."""
    with _workdir() as d:
        path = d / "data.parquet"
        path.write_bytes(data)
        check(lambda: _read_data(path, None))


def small_dataset_files() -> dict[str, bytes]:
    """A tiny valid ``datasets`` save_to_disk folder: {file name: bytes} (its Arrow file is what is fuzzed)."""
    import datasets

    with _workdir() as d:
        datasets.Dataset.from_dict({"text": ["layerscope reads text.", "A second document, a little longer."],
                                    "id": [0, 1]}).save_to_disk(str(d / "ds"))
        return {p.name: p.read_bytes() for p in (d / "ds").iterdir() if p.is_file()}


_DATASET: dict[str, bytes] | None = None


def target_data_datasets(data: bytes) -> None:
    """``--data FOLDER`` written by ``datasets``' save_to_disk: the Arrow data file is the fuzzed bytes
    (state.json and dataset_info.json are the valid ones beside it)."""
    global _DATASET
    if _DATASET is None:
        _DATASET = small_dataset_files()
    with _workdir() as d:
        for name, content in _DATASET.items():
            (d / name).write_bytes(data if name.endswith(".arrow") else content)
        check(lambda: _read_data(d, None))


TARGETS: dict[str, Callable[[bytes], None]] = {
    "safetensors": target_safetensors,
    "shard_index": target_shard_index,
    "config_json": target_config_json,
    "trainer_state": target_trainer_state,
    "torch_pickle": target_torch_pickle,
    "data_text": target_data_text,
    "data_jsonl": target_data_jsonl,
    "data_parquet": target_data_parquet,
    "data_datasets": target_data_datasets,
}

CORPUS = Path(__file__).resolve().parent / "corpus"
REGRESSIONS = Path(__file__).resolve().parent / "regressions"


def seeds(name: str) -> list[Path]:
    """The committed seed corpus and the regression inputs (crashes found and fixed) of a target."""
    out = []
    for folder in (CORPUS / name, REGRESSIONS / name):
        if folder.is_dir():
            out += sorted(p for p in folder.iterdir() if p.is_file())
    return out


if __name__ == "__main__":  # replay: python tests/fuzz/targets.py NAME FILE...
    import sys

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    fn = TARGETS[sys.argv[1]]
    for f in sys.argv[2:]:
        fn(Path(f).read_bytes())
        print(f"ok {f}")
