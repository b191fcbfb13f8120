"""A live ``torch.nn.Module`` (or a plain state dict) as a source: tensors are snapshotted to CPU one at a time."""

from __future__ import annotations

from typing import Any

import torch

from .base import Source, TensorInfo, dtype_name, normalise_name


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """Peel DistributedDataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(module, "_orig_mod", None) or (
            module.module if isinstance(getattr(module, "module", None), torch.nn.Module) else None
        )
        if inner is None:
            return module
        module = inner


class StateDictSource(Source):
    def __init__(self, tensors: dict[str, torch.Tensor], label: str, config: dict[str, Any] | None = None, step: int | None = None):
        super().__init__(label=label, format="state_dict", config=config, step=step)
        self._tensors: dict[str, torch.Tensor] = {}
        for raw_name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                continue
            name = normalise_name(raw_name)
            if name not in self._tensors:
                self._tensors[name] = t
                self.infos[name] = TensorInfo(name, tuple(t.shape), dtype_name(t.dtype))

    def load(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach().to("cpu").contiguous()


class ModuleSource(StateDictSource):
    def __init__(self, module: torch.nn.Module, label: str | None = None, step: int | None = None):
        module = unwrap(module)
        config = getattr(module, "config", None)
        config_dict = config.to_dict() if hasattr(config, "to_dict") else None
        super().__init__(module.state_dict(), label=label or type(module).__name__, config=config_dict, step=step)
        self.format = "module"
