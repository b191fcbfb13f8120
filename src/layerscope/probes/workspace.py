"""Work buffers reused from batch to batch.

Why: the activations probe reduces every batch with a dozen operations over tensors as large as the
batch's attention or logits. Fresh outputs of that size cost more than the arithmetic on the CPU
(each new multi-megabyte allocation is mapped and page-faulted anew; measured 2-5× the operation
itself on the test machine), so those operations write into buffers that live as long as the
accumulator: memory stays bounded by one batch, allocated once.
"""

from __future__ import annotations

import torch


class Workspace:
    """name -> a tensor of the last requested shape, dtype and device (reallocated when they change)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> torch.Tensor:
        buf = self._buffers.get(name)
        shape = tuple(shape)
        if buf is None or tuple(buf.shape) != shape or buf.dtype != dtype or buf.device != torch.device(device):
            buf = self._buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf
