"""safetensors, single file or sharded, read one tensor at a time with plain ``readinto``.

The header is validated completely before anything is trusted (the lesson of the safetensors
project): a truncated file, a header length past the end, a header that is not JSON, or a tensor
whose byte span disagrees with its shape is reported as one clear error. Tensors are read with
``readinto`` rather than ``mmap`` so resident memory is only what is in flight.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ..errors import LayerscopeError, TensorReadError
from .base import Source, TensorInfo, file_fingerprint, normalise_name, read_config_json

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)

MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """Parse and validate a safetensors header; return (entries, byte offset of the data section)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise LayerscopeError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", prefix)
            if n > size - 8:
                raise LayerscopeError(f"{path}: corrupt safetensors header: header length {n} is larger than the file ({size} bytes)")
            if n > MAX_HEADER:
                raise LayerscopeError(f"{path}: corrupt safetensors header: header length {n} exceeds the 100 MB limit")
            raw = f.read(n)
    except OSError as exc:
        raise LayerscopeError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise LayerscopeError(f"{path}: corrupt safetensors header: not valid JSON") from None
    if not isinstance(header, dict):
        raise LayerscopeError(f"{path}: corrupt safetensors header: expected a JSON object")
    data_start = 8 + n
    data_size = size - data_start
    entries: dict[str, dict] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_code, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = [int(s) for s in shape]
            start, end = int(start), int(end)
        except (KeyError, TypeError, ValueError):
            raise LayerscopeError(f"{path}: corrupt safetensors header: entry {name!r} lacks dtype/shape/data_offsets") from None
        if dtype_code not in SAFETENSORS_DTYPES:
            raise LayerscopeError(f"{path}: tensor {name!r} has unsupported dtype {dtype_code}")
        if any(s < 0 for s in shape) or start < 0 or end < start:
            raise LayerscopeError(f"{path}: corrupt safetensors header: tensor {name!r} has invalid shape or offsets")
        itemsize = torch.empty((), dtype=SAFETENSORS_DTYPES[dtype_code]).element_size()
        numel = 1
        for s in shape:
            numel *= s
        if end - start != numel * itemsize:
            raise LayerscopeError(
                f"{path}: tensor {name!r} occupies {end - start} bytes but shape {shape} of {dtype_code} needs {numel * itemsize}"
            )
        if end > data_size:
            raise LayerscopeError(
                f"{path}: truncated file: tensor {name!r} ends at byte {end} of a data section of only {data_size} bytes"
            )
        entries[name] = {"dtype": SAFETENSORS_DTYPES[dtype_code], "shape": tuple(shape), "start": data_start + start, "nbytes": end - start}
    return entries, data_start


class SafetensorsSource(Source):
    def __init__(self, files: list[Path], label: str, directory: Path | None):
        super().__init__(label=label, format="safetensors", directory=directory, config=read_config_json(directory))
        self._where: dict[str, tuple[Path, str, dict]] = {}
        for path in files:
            entries, _ = read_header(path)
            for raw_name, entry in entries.items():
                name = normalise_name(raw_name)
                if name in self._where:
                    continue
                self._where[name] = (path, raw_name, entry)
                self.infos[name] = TensorInfo(name, entry["shape"], str(entry["dtype"]).removeprefix("torch."))
        if not self.infos:
            raise LayerscopeError(f"{label}: the checkpoint holds no tensors")

    def load(self, name: str) -> torch.Tensor:
        path, raw_name, entry = self._where[name]
        buf = torch.empty(entry["nbytes"], dtype=torch.uint8)
        try:
            with open(path, "rb") as f:
                f.seek(entry["start"])
                got = f.readinto(memoryview(buf.numpy())) if entry["nbytes"] else 0
        except OSError as exc:
            raise TensorReadError(f"{path}: cannot read tensor {raw_name!r}: {exc.strerror or exc}") from None
        if got != entry["nbytes"]:
            raise TensorReadError(f"{path}: truncated while reading tensor {raw_name!r}")
        return buf.view(entry["dtype"]).reshape(entry["shape"])

    def fingerprint(self, name: str) -> str | None:
        path, raw_name, _ = self._where[name]
        return file_fingerprint(path, raw_name)


def sharded_files(index_path: Path) -> list[Path]:
    """The shard files named by a ``*.index.json`` (HF format), validated to exist."""
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        shard_names = list(dict.fromkeys(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise LayerscopeError(f"{index_path}: not a valid shard index (expected a JSON object with 'weight_map')") from None
    files = []
    for shard in shard_names:
        path = index_path.parent / shard
        if not path.is_file():
            raise LayerscopeError(f"{index_path}: shard {shard} listed in the index is missing")
        files.append(path)
    return files
