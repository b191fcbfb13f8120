"""PyTorch pickles (``.bin``, ``.pt``, sharded ``pytorch_model.bin.index.json``) and nanoGPT ``ckpt.pt``.

Always ``torch.load(weights_only=True)``: a checkpoint that holds anything but tensors and plain
containers is refused, never executed. Zip-format files are memory-mapped so a tensor's bytes are
only touched when it is analysed.
"""

from __future__ import annotations

import pickle
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import LayerscopeError, TensorReadError
from .base import Source, TensorInfo, dtype_name, file_fingerprint, normalise_name, read_config_json

#: Keys under which trainers nest the state dict (nanoGPT "model", Lightning "state_dict").
STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "module")


def _legacy_storage_bytes(path: Path) -> int:
    """Bytes of storage a legacy (non-zip) torch pickle declares, read from its opcodes without loading.

    torch's legacy loader allocates each declared storage BEFORE reading its bytes, so a
    400-byte file could ask for gigabytes (found while fuzzing): the declared sizes are checked
    against the file size first. A persistent id is ('storage', type, key, location, numel, ...);
    its numel is the largest integer between the tuple's MARK and the BINPERSID.
    """
    import pickletools

    declared = 0
    with open(path, "rb") as f:
        for _ in range(4):  # magic number, protocol, sys info, then the object pickle
            ints: list[int] = []
            for op, arg, _pos in pickletools.genops(f):
                if op.name == "MARK":
                    ints = []
                elif isinstance(arg, int) and not isinstance(arg, bool) and op.name.startswith(("BININT", "INT", "LONG")):
                    ints.append(arg)
                elif op.name == "BINPERSID" and ints:
                    declared += 8 * max(ints)  # 8 bytes: the widest element type
                if op.name == "STOP":
                    break
    return declared


def load_pickle(path: Path) -> Any:
    mmap = zipfile.is_zipfile(path)
    if not mmap:
        try:
            declared = _legacy_storage_bytes(path)
        except Exception:  # noqa: BLE001 - not even a pickle stream: torch.load below says so
            declared = 0
        size = path.stat().st_size
        if declared > size:
            raise LayerscopeError(f"{path}: corrupt PyTorch checkpoint: it declares {declared} bytes of tensor data "
                                  f"in a {size}-byte file")
    try:
        with warnings.catch_warnings():  # corrupt files trigger torch warnings ("pickle protocol 81"):
            warnings.simplefilter("ignore")  # the one-line error below says it all
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "Weights only load failed" in first:
            raise LayerscopeError(
                f"{path}: refused: the pickle contains objects other than tensors, and layerscope never executes code from a checkpoint (weights_only=True)"
            ) from None
        raise LayerscopeError(f"{path}: corrupt PyTorch checkpoint: {first}") from None
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: torch's loaders raise AssertionError,
        # KeyError, IndexError, struct.error ... on corrupt input (found by fuzzing); all mean "corrupt"
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LayerscopeError(f"{path}: cannot read PyTorch checkpoint: {msg}") from None


def extract_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Find the tensors in a loaded pickle; return them and the trainer's metadata around them."""
    meta: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                meta = {k: v for k, v in obj.items() if k != key}
                obj = inner
                break
    if not isinstance(obj, dict):
        raise LayerscopeError(f"{path}: not a state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise LayerscopeError(f"{path}: the checkpoint holds no tensors")
    return tensors, meta


class TorchSource(Source):
    """One or more pickle files; with several (shards) only one shard is held at a time."""

    def __init__(self, files: list[Path], label: str, directory: Path | None):
        super().__init__(label=label, format="pytorch", directory=directory, config=read_config_json(directory))
        self._files = files
        self._where: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()
        self._cached: tuple[int, dict[str, torch.Tensor]] | None = None
        for i, path in enumerate(files):
            tensors, meta = extract_state_dict(load_pickle(path), path)
            self._absorb_meta(meta)
            for raw_name, t in tensors.items():
                name = normalise_name(raw_name)
                if name not in self._where:
                    self._where[name] = (i, raw_name)
                    self.infos[name] = TensorInfo(name, tuple(t.shape), dtype_name(t.dtype))
            self._cached = (i, tensors)

    def _absorb_meta(self, meta: dict[str, Any]) -> None:
        if "model_args" in meta and isinstance(meta["model_args"], dict):
            self.format = "nanogpt"
            self.config = {"model_type": "nanogpt", **meta["model_args"]}
        for key in ("iter_num", "step", "global_step"):
            if isinstance(meta.get(key), int):
                self.step = meta[key]
                break

    def _shard(self, i: int) -> dict[str, torch.Tensor]:
        with self._lock:
            if self._cached is None or self._cached[0] != i:
                self._cached = None  # drop the previous shard before loading the next
                tensors, _ = extract_state_dict(load_pickle(self._files[i]), self._files[i])
                self._cached = (i, tensors)
            return self._cached[1]

    def load(self, name: str) -> torch.Tensor:
        i, raw_name = self._where[name]
        try:
            t = self._shard(i)[raw_name]
            return t.detach().contiguous()
        except (RuntimeError, OSError) as exc:
            raise TensorReadError(f"{self._files[i]}: cannot read tensor {raw_name!r}: {exc}") from None

    def shard_order(self) -> list[str]:
        return sorted(self.infos, key=lambda n: self._where[n][0])

    def fingerprint(self, name: str) -> str | None:
        i, raw_name = self._where[name]
        return file_fingerprint(self._files[i], raw_name)


def torch_sharded_files(index_path: Path) -> list[Path]:
    from .safetensors_file import sharded_files

    return sharded_files(index_path)
