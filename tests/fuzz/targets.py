"""Fuzz targets: every parser that reads untrusted bytes, each a function of the raw bytes.

The contract every target checks (``check``): the bytes either parse, or the parser raises one
``LayerscopeError`` whose message is one line (the CLI prints it and exits 2). Anything else — any
other exception (a traceback), a hang (the fuzzer's ``-timeout``), or a tensor allocation larger
than the file that was read — is a crash. The targets drive the real code paths, from the file on
disk through ``open_source`` to reading every tensor and building the anatomy, as ``analyze`` does.

Used by ``fuzz.py`` (atheris, coverage-guided), by tests/test_fuzz.py (the committed seed corpus,
the regression inputs, and a bounded atheris run per target in CI) and by scripts/fuzz.sh.

PROBES DATA READERS: the probes' data readers (src/layerscope/probes/data.py, being written on
another branch) read untrusted token files / text and belong here too: add one ``target_*``
function per reader below (write the bytes where the reader expects a data file, call the
reader, ``check`` the contract), register it in TARGETS, and commit seeds under
tests/fuzz/corpus/<name>/. Nothing else needs to change: test_fuzz.py and scripts/fuzz.sh run
every registered target.
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


TARGETS: dict[str, Callable[[bytes], None]] = {
    "safetensors": target_safetensors,
    "shard_index": target_shard_index,
    "config_json": target_config_json,
    "trainer_state": target_trainer_state,
    "torch_pickle": target_torch_pickle,
    # "probes_data": target_probes_data,  <- add the probes' data readers here (see the docstring)
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
