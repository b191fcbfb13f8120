"""The one interface every checkpoint format is turned into: a lazy ``name -> tensor`` mapping.

Nothing above this layer knows which format a tensor came from. A source lists its tensors
(name, shape, dtype) without reading their data, and reads one tensor at a time on demand, so
memory is bounded by the tensors in flight, never by the model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: Prefixes added by wrappers (torch.compile, DistributedDataParallel) that are not part of the name.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def normalise_name(name: str) -> str:
    """Strip wrapper prefixes so a compiled or DDP checkpoint names tensors like its clean twin."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                changed = True
    return name


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def content_hash(tensor: torch.Tensor) -> str:
    """A digest of dtype, shape and bytes: equal tensors share cached results wherever they live."""
    h = hashlib.sha256()  # SHA extensions make it ~2x faster than blake2b on current x86
    h.update(f"{dtype_name(tensor.dtype)}|{tuple(tensor.shape)}|".encode())
    flat = tensor.detach().reshape(-1)
    if flat.numel():
        if flat.device.type != "cpu":
            flat = flat.cpu()
        flat = flat.contiguous()
        # bytes view without a copy; bool/fp8 and friends go through uint8 the same way
        h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Source:
    """Base class of all sources. Subclasses fill ``infos`` and implement ``load``."""

    label: str
    format: str
    infos: dict[str, TensorInfo] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    directory: Path | None = None
    step: int | None = None
    revision: str | None = None

    def names(self) -> list[str]:
        return list(self.infos)

    def load(self, name: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def fingerprint(self, name: str) -> str | None:
        """A cheap identity of the stored bytes (file, size, mtime, name) or None if there is none.

        Lets a re-run find a tensor's content hash in the store without reading the tensor.
        """
        return None

    def read(self, name: str) -> tuple[torch.Tensor, str]:
        tensor = self.load(name)
        return tensor, content_hash(tensor)

    @property
    def display_name(self) -> str:
        """A short name for titles: the model's own name if its config has one, else the file or folder."""
        if self.config and isinstance(self.config.get("_name_or_path"), str) and self.config["_name_or_path"]:
            return self.config["_name_or_path"].rstrip("/").rsplit("/", 1)[-1]
        path = Path(self.label)
        return path.parent.name if path.name in ("model", "") else path.name

    @property
    def tokenizer_file(self) -> Path | None:
        if self.directory is None:
            return None
        path = self.directory / "tokenizer.json"
        return path if path.is_file() else None


def read_config_json(directory: Path | None) -> dict[str, Any] | None:
    if directory is None:
        return None
    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def file_fingerprint(path: Path, name: str) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{name}"
