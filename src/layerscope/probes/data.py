"""The fixed, hashed set of batches every probe runs on.

Text comes from ``--data`` (a text file, a folder of ``.txt``, ``.jsonl`` with ``--text-field``,
``.parquet``, or a ``datasets`` folder written by ``save_to_disk``) or, without ``--data``, from the
default evaluation text (:func:`default_text`). It is tokenised with the model's own tokenizer (bytes
for a 256-token vocabulary without one), the documents are joined (EOS between them when the
tokenizer has one) and packed into windows, and ``batches × batch_size`` windows are drawn with a
seeded permutation. The result is two integer tensors, so every probe sees the same tokens and the
data's identity is one content hash of them.

Both objectives share one layout: ``input_ids`` and ``labels`` of shape ``(batches, batch_size,
seq_len)``, with ``labels == -100`` where there is no target. Causal LM: windows of ``seq_len + 1``
tokens, inputs ``w[:-1]``, labels ``w[1:]`` (already shifted). Masked LM: 15% of the non-special
positions, drawn with the seed, are targets; of those 80% become the mask token, 10% a random token
and 10% stay (BERT's recipe), and the rest are -100.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import LayerscopeError

IGNORE = -100
MASK_RATE = 0.15
DEFAULT_SEQ_LEN = 128
DEFAULT_TEXT_NAME = "python-reference-topics"


@dataclass
class ProbeData:
    """Batches of token windows (``input_ids``/``labels``: ``(batches, batch_size, seq_len)``) or, for a
    custom module, a list of the user's ``(inputs, targets)`` batches in ``pairs``."""

    input_ids: torch.Tensor | None
    labels: torch.Tensor | None
    hash: str
    description: str
    tokens: int = 0  # target tokens (labels != -100), the count the mean loss divides by
    pairs: list[tuple[Any, Any]] | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def n_batches(self) -> int:
        return len(self.pairs) if self.pairs is not None else int(self.input_ids.shape[0])

    def batch(self, i: int) -> tuple[Any, Any]:
        """Batch ``i`` as (inputs, targets)."""
        if self.pairs is not None:
            return self.pairs[i]
        return self.input_ids[i], self.labels[i]

    def split(self, held_out: int) -> tuple["ProbeData", "ProbeData"]:
        """The first ``n - held_out`` batches and the last ``held_out`` (e.g. for pruning curves)."""
        n = self.n_batches
        if not 0 < held_out < n:
            raise LayerscopeError(f"cannot hold out {held_out} of {n} batches")
        if self.pairs is not None:
            a, b = self.pairs[: n - held_out], self.pairs[n - held_out:]
            return (ProbeData(None, None, _pairs_hash(a), self.description, pairs=a),
                    ProbeData(None, None, _pairs_hash(b), self.description, pairs=b))
        parts = []
        for sl in (slice(0, n - held_out), slice(n - held_out, n)):
            ids, lab = self.input_ids[sl], self.labels[sl]
            parts.append(ProbeData(ids, lab, token_hash(ids, lab), self.description, int((lab != IGNORE).sum()),
                                   params=dict(self.params)))
        return parts[0], parts[1]


# -- reading text ---------------------------------------------------------------------------------
def default_text() -> tuple[list[str], str]:
    """The default evaluation text: the help topics of the Python language reference.

    ``pydoc_data.topics`` ships with every CPython (it is what ``help('if')`` prints): ~460k
    characters of English technical prose with code examples, the mix most language models are
    trained on. It needs no network, it is the same on every machine with the same Python (its version
    is in the description and the text's hash is in every store key), and it is not part of the
    corpus ``examples/train_gpt.py`` trains on (which reads the standard library's ``.py`` files in
    path order and stops long before ``pydoc_data``), so the example model is evaluated on held-out
    text. It is a fair yardstick for comparing checkpoints with each other, not a benchmark score.
    """
    import platform

    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - stripped Python installs
        raise LayerscopeError("no --data given and this Python has no pydoc_data (the default text): pass --data") from None
    docs = [topics[k] for k in sorted(topics)]
    return docs, f"{DEFAULT_TEXT_NAME} (pydoc_data.topics of Python {platform.python_version()}, {len(docs)} topics)"


def read_texts(path: str | Path, text_field: str | None = None) -> tuple[list[str], str]:
    """Documents from a file or folder, and a short description."""
    path = Path(path).expanduser()
    if not path.exists():
        raise LayerscopeError(f"--data {path}: no such file or directory")
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _read_datasets(path, text_field)
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise LayerscopeError(f"--data {path}: the folder holds no .txt files (nor a datasets save_to_disk folder)")
        return [_read_text_file(p) for p in files], f"{path} ({len(files)} .txt files)"
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, text_field), f"{path} (field {text_field or 'text'})"
    if suffix == ".parquet":
        return _read_parquet(path, text_field), f"{path} (column {text_field or 'text'})"
    return [_read_text_file(path)], str(path)


def _read_text_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LayerscopeError(f"--data {path}: cannot read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise LayerscopeError(f"--data {path}: not UTF-8 text") from None


def _pick_field(record: dict, text_field: str | None, where: str) -> str:
    key = text_field or "text"
    if key not in record:
        known = ", ".join(sorted(map(str, record))[:8])
        raise LayerscopeError(f"--data {where}: no field {key!r} (fields: {known}); choose one with --text-field")
    value = record[key]
    if not isinstance(value, str):
        raise LayerscopeError(f"--data {where}: field {key!r} is {type(value).__name__}, not text")
    try:  # JSON may escape a lone UTF-16 surrogate ("\udc00"): a str no tokenizer can encode (found by fuzzing)
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise LayerscopeError(f"--data {where}: field {key!r} is not valid Unicode text (a lone surrogate escape)") from None
    return value


def _read_jsonl(path: Path, text_field: str | None) -> list[str]:
    # bytes, decoded line by line: a line that is not UTF-8 is named (a text-mode file raised
    # UnicodeDecodeError from the iteration, found by fuzzing)
    docs = []
    try:
        with open(path, "rb") as f:
            for i, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise LayerscopeError(f"--data {path}: line {i} is not UTF-8 text") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
                    raise LayerscopeError(f"--data {path}: line {i} is not JSON") from None
                if not isinstance(record, dict):
                    raise LayerscopeError(f"--data {path}: line {i} is not a JSON object")
                docs.append(_pick_field(record, text_field, f"{path} line {i}"))
    except OSError as exc:
        raise LayerscopeError(f"--data {path}: cannot read: {exc.strerror or exc}") from None
    return docs


def _read_parquet(path: Path, text_field: str | None) -> list[str]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except ImportError:
        raise LayerscopeError(f"--data {path}: reading Parquet needs pyarrow (pip install 'layerscope[parquet]')") from None
    except Exception as exc:
        raise LayerscopeError(f"--data {path}: cannot read Parquet: {str(exc).splitlines()[0]}") from None
    return _text_column(path, text_field, list(map(str, frame.columns)), lambda key: frame[key])


def _text_column(path: Path, text_field: str | None, columns: list[str], column: Callable[[str], Any]) -> list[str]:
    """The texts of a table's column (Parquet, datasets), or the one-line error that says which."""
    key = text_field or "text"
    if key not in columns:
        raise LayerscopeError(f"--data {path}: no column {key!r} (columns: {', '.join(columns[:8])}); "
                              "choose one with --text-field")
    try:
        values = list(column(key))
    except UnicodeDecodeError:  # a string column holding bytes that are not UTF-8 (found by fuzzing Parquet)
        raise LayerscopeError(f"--data {path}: column {key!r} holds bytes that are not UTF-8 text") from None
    if not all(isinstance(v, str) for v in values):
        raise LayerscopeError(f"--data {path}: column {key!r} is not text")
    return values


def _read_datasets(path: Path, text_field: str | None) -> tuple[list[str], str]:
    try:
        import datasets
    except ImportError:
        raise LayerscopeError(f"--data {path}: a datasets save_to_disk folder needs the datasets package: pip install datasets") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise LayerscopeError(f"--data {path}: cannot load the dataset: {str(exc).splitlines()[0]}") from None
    split = ""
    if isinstance(ds, datasets.DatasetDict):
        split = "test" if "test" in ds else "validation" if "validation" in ds else sorted(ds)[0]
        ds = ds[split]
    try:
        # the Arrow file is memory-mapped and read without checking its offsets: a corrupt one made the
        # column read run past the mapping (SIGBUS, found by fuzzing); a full validation reads it first
        ds.data.validate(full=True)
    except Exception as exc:
        raise LayerscopeError(f"--data {path}: the dataset's Arrow data is corrupt: {str(exc).splitlines()[0]}") from None
    docs = _text_column(path, text_field, list(ds.column_names), lambda key: ds[key])
    return docs, f"{path} (datasets{', split ' + split if split else ''}, column {text_field or 'text'})"


# -- tokenising -----------------------------------------------------------------------------------
@dataclass
class Tokenizer:
    """encode(text) -> ids, with the special ids packing needs."""

    encode: Callable[[str], list[int]]
    name: str
    eos_id: int | None = None
    cls_id: int | None = None
    sep_id: int | None = None
    mask_id: int | None = None
    special_ids: tuple[int, ...] = ()


def byte_tokenizer() -> Tokenizer:
    return Tokenizer(lambda text: list(text.encode("utf-8")), "bytes (256-token vocabulary)")


def load_tokenizer(directory: Path | None, vocab_size: int | None, label: str = "model") -> Tokenizer:
    """The checkpoint's tokenizer (``AutoTokenizer``, no remote code), or bytes for a 256-token vocab."""
    has_files = directory is not None and any((directory / f).is_file() for f in (
        "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model"))
    if not has_files:
        if vocab_size == 256:
            return byte_tokenizer()
        raise LayerscopeError(f"{label}: no tokenizer beside the checkpoint (tokenizer.json, vocab.txt, ...) and a "
                              f"{vocab_size}-token vocabulary is not bytes: add the tokenizer files to the folder")
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        tok = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as exc:
        raise LayerscopeError(f"{label}: cannot load its tokenizer: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    return Tokenizer(encode, type(tok).__name__, eos_id=tok.eos_token_id, cls_id=tok.cls_token_id,
                     sep_id=tok.sep_token_id, mask_id=tok.mask_token_id, special_ids=tuple(tok.all_special_ids))


def token_hash(*tensors: torch.Tensor) -> str:
    """sha256 of the token tensors' shapes and int64 bytes: the data's identity in every store key."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu", torch.int64).contiguous()
        h.update(f"{tuple(t.shape)}|".encode())
        h.update(memoryview(t.numpy()).cast("B"))
    return h.hexdigest()[:32]


def _pairs_hash(pairs: Sequence[tuple[Any, Any]]) -> str:
    from ..sources import content_hash

    h = hashlib.sha256()
    for batch in pairs:
        for item in batch:
            if isinstance(item, torch.Tensor):
                h.update(content_hash(item).encode())
            else:
                h.update(repr(item).encode())
    return h.hexdigest()[:32]


def from_pairs(pairs: Sequence[tuple[Any, Any]] | tuple[Any, Any], description: str = "batches from Python") -> ProbeData:
    """The user's ``(inputs, targets)`` batches (one pair, or a list/loader of them) as ProbeData."""
    if isinstance(pairs, tuple) and len(pairs) == 2 and isinstance(pairs[0], torch.Tensor):
        pairs = [pairs]
    pairs = [tuple(b) for b in pairs]
    if not pairs:
        raise LayerscopeError("data: no batches given")
    for b in pairs:
        if len(b) != 2:
            raise LayerscopeError("data: each batch must be an (inputs, targets) pair")
    return ProbeData(None, None, _pairs_hash(pairs), description, pairs=pairs)


def make_batches(docs: list[str], tokenizer: Tokenizer, *, kind: str, seq_len: int, batches: int, batch_size: int,
                 seed: int = 0, vocab_size: int | None = None, description: str = "text") -> ProbeData:
    """Tokenise, pack and draw ``batches × batch_size`` windows (see the module docstring)."""
    for name, value in (("--seq-len", seq_len), ("--batches", batches), ("--batch-size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise LayerscopeError(f"{name} must be a positive integer, got {value!r}")
    if kind not in ("causal", "masked"):
        raise LayerscopeError(f"data: cannot make token batches for a model of kind {kind!r}")
    docs = [d for d in docs if d and d.strip()]
    if not docs:
        raise LayerscopeError(f"--data {description}: empty (no text)")
    stream: list[int] = []
    for d in docs:
        stream.extend(tokenizer.encode(d))
        if tokenizer.eos_id is not None and kind == "causal":
            stream.append(tokenizer.eos_id)
    ids = torch.tensor(stream, dtype=torch.int64)
    if vocab_size is not None and len(ids) and int(ids.max()) >= vocab_size:
        raise LayerscopeError(f"tokenizer mismatch: token id {int(ids.max())} from {tokenizer.name} is outside the "
                              f"model's {vocab_size}-token vocabulary")
    specials = [t for t in (tokenizer.cls_id, tokenizer.sep_id) if t is not None] if kind == "masked" else []
    body = seq_len + 1 if kind == "causal" else seq_len - len(specials)
    if body < 2:
        raise LayerscopeError(f"--seq-len {seq_len} is too short")
    n_windows = len(ids) // body
    need = batches * batch_size
    if n_windows < need:
        raise LayerscopeError(f"--data {description}: too short: {len(ids):,} tokens give {n_windows} windows of {body} "
                              f"tokens, and --batches {batches} × --batch-size {batch_size} need {need}")
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n_windows, generator=gen)[:need]
    windows = ids[: n_windows * body].view(n_windows, body)[chosen]
    if kind == "causal":
        inputs, labels = windows[:, :-1], windows[:, 1:].clone()
    else:
        inputs, labels = _mask(windows, tokenizer, specials, vocab_size, gen)
    inputs = inputs.reshape(batches, batch_size, -1).contiguous()
    labels = labels.reshape(batches, batch_size, -1).contiguous()
    tokens = int((labels != IGNORE).sum())
    if tokens == 0:
        raise LayerscopeError(f"--data {description}: no target tokens (too short for masking)")
    params = {"kind": kind, "seq_len": seq_len, "batches": batches, "batch_size": batch_size, "seed": seed,
              "tokenizer": tokenizer.name}
    return ProbeData(inputs, labels, token_hash(inputs, labels), description, tokens, params=params)


def _mask(windows: torch.Tensor, tokenizer: Tokenizer, specials: list[int], vocab_size: int | None,
          gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking with a seeded generator: 15% targets; 80% [MASK], 10% random, 10% unchanged."""
    if tokenizer.mask_id is None:
        raise LayerscopeError(f"masked LM: the tokenizer ({tokenizer.name}) has no mask token")
    n, body = windows.shape
    chosen = torch.rand(n, body, generator=gen) < MASK_RATE
    chosen[:, 0] |= ~chosen.any(dim=1)  # at least one target per window
    labels = torch.where(chosen, windows, torch.full_like(windows, IGNORE))
    roll = torch.rand(n, body, generator=gen)
    inputs = windows.clone()
    inputs[chosen & (roll < 0.8)] = tokenizer.mask_id
    rand_pos = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[rand_pos] = torch.randint(0, vocab_size or int(windows.max()) + 1, (int(rand_pos.sum()),), generator=gen)
    if specials:
        pre = torch.full((n, 1), specials[0], dtype=windows.dtype)
        post = torch.full((n, 1), specials[-1], dtype=windows.dtype) if len(specials) > 1 else None
        pad = torch.full((n, 1), IGNORE, dtype=windows.dtype)
        inputs = torch.cat([pre, inputs] + ([post] if post is not None else []), dim=1)
        labels = torch.cat([pad, labels] + ([pad] if post is not None else []), dim=1)
    return inputs, labels


def documents(data: Any, text_field: str | None = None) -> tuple[list[str], str]:
    """The texts behind ``data`` (None: the default text; a path; a list of strings) and a description."""
    if data is None:
        return default_text()
    if isinstance(data, (str, Path)):
        return read_texts(data, text_field)
    if isinstance(data, (list, tuple)) and all(isinstance(d, str) for d in data):
        return list(data), f"{len(data)} texts from Python"
    raise LayerscopeError(f"data: expected a path, a list of texts or ProbeData, got {type(data).__name__}")


def load_data(model: Any, data: Any = None, *, text_field: str | None = None, seq_len: int | None = None,
              batches: int = 4, batch_size: int = 8, seed: int = 0) -> ProbeData:
    """ProbeData for ``model`` (a RunnableModel) from ``data``: None (the default text), a path, a list of
    strings, ProbeData, or for a custom module its ``(inputs, targets)`` batches."""
    if isinstance(data, ProbeData):
        return data
    if model.kind == "custom":
        if data is None or isinstance(data, (str, Path)):
            raise LayerscopeError("a module with its own loss_fn needs data=[(inputs, targets), ...]")
        return from_pairs(data)
    model.require_lm_head("running on data")
    docs, description = documents(data, text_field)
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, model.max_positions or DEFAULT_SEQ_LEN)
    if model.max_positions and seq_len > model.max_positions:
        raise LayerscopeError(f"--seq-len {seq_len} is longer than the model's {model.max_positions} positions")
    tokenizer = load_tokenizer(model.tokenizer_dir, model.vocab_size, model.label)
    return make_batches(docs, tokenizer, kind=model.kind, seq_len=seq_len, batches=batches, batch_size=batch_size,
                        seed=seed, vocab_size=model.vocab_size, description=description)
