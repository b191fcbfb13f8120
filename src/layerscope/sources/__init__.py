"""Turn whatever the user points at into a :class:`Source`.

Accepted: a ``.safetensors`` file, a folder with one or with shards and an index, PyTorch
``.bin``/``.pt`` files (sharded too), a nanoGPT ``ckpt.pt``, a hub repo id, a live
``torch.nn.Module`` or a plain state dict.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import LayerscopeError
from . import hub
from .base import Source, TensorInfo, content_hash, normalise_name
from .module import ModuleSource, StateDictSource
from .safetensors_file import SafetensorsSource, sharded_files
from .torch_file import TorchSource

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

__all__ = ["Source", "TensorInfo", "open_source", "content_hash", "normalise_name"]


def open_source(spec: Any, revision: str | None = None) -> Source:
    if isinstance(spec, Source):
        return spec
    if isinstance(spec, torch.nn.Module):
        return ModuleSource(spec)
    if isinstance(spec, dict):
        return StateDictSource(spec, label="state_dict")
    if not isinstance(spec, (str, os.PathLike)):
        raise LayerscopeError(f"cannot analyse an object of type {type(spec).__name__}: pass a path, a hub repo id or an nn.Module")
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.exists():
        source = _open_path(path)
    elif hub.looks_like_repo_id(text):
        source = _open_path(hub.download(text, revision))
        source.label = text
        source.revision = revision
    else:
        raise LayerscopeError(f"{text}: no such file or directory")
    return source


def _open_path(path: Path) -> Source:
    if path.is_file():
        name = path.name
        if name.endswith(".safetensors.index.json"):
            return SafetensorsSource(sharded_files(path), str(path), path.parent)
        if name.endswith(".bin.index.json"):
            return TorchSource(sharded_files(path), str(path), path.parent)
        if name.endswith(".safetensors"):
            return SafetensorsSource([path], str(path), path.parent)
        if name.endswith(PICKLE_SUFFIXES):
            return TorchSource([path], str(path), path.parent)
        raise LayerscopeError(f"{path}: unknown checkpoint format (expected .safetensors, .bin, .pt, .pth or .ckpt)")
    if not path.is_dir():
        raise LayerscopeError(f"{path}: not a file or directory")
    for index in ("model.safetensors.index.json",):
        if (path / index).is_file():
            return SafetensorsSource(sharded_files(path / index), str(path), path)
    st_files = sorted(path.glob("*.safetensors"))
    if st_files:
        return SafetensorsSource(st_files, str(path), path)
    if (path / "pytorch_model.bin.index.json").is_file():
        return TorchSource(sharded_files(path / "pytorch_model.bin.index.json"), str(path), path)
    pickles = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES)
                     and not p.name.startswith(("optimizer", "scheduler", "rng_state", "training_args")))
    if len(pickles) == 1:
        return TorchSource(pickles, str(path), path)
    if len(pickles) > 1:
        preferred = [p for p in pickles if p.name in ("pytorch_model.bin", "ckpt.pt", "model.pt")]
        if len(preferred) == 1:
            return TorchSource(preferred, str(path), path)
        names = ", ".join(p.name for p in pickles[:5])
        raise LayerscopeError(f"{path}: several checkpoints and no index ({names}); point at one file")
    raise LayerscopeError(f"{path}: no weights found (looked for *.safetensors, *.bin, *.pt, *.pth, *.ckpt)")
