"""Copies of a live model's weights that the training loop can take without waiting.

On CUDA each slot is a set of pinned host buffers allocated once; a snapshot is a batch of
``non_blocking`` copies on a side stream that first waits for the work already queued on the
training stream. The training stream then waits (on the GPU, not the host) for the copies to
finish before its next kernels, so an in-place optimizer step can never race a copy; the host
thread never blocks. On the CPU a snapshot is a plain copy into the slot's buffers.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from typing import Any

import torch

from ..sources.module import unwrap


def live_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The floating-point parameters of ``model`` (wrappers peeled, tied weights once, by first name)."""
    inner = unwrap(model)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, p in inner.named_parameters(remove_duplicate=False):
        if not p.is_floating_point() or id(p) in seen:
            continue
        seen.add(id(p))
        out[name] = p
    return out


def snapshot_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class Snapshot:
    """One step's weights on the host. ``wait()`` (called by the analysis thread) returns once
    the copies have landed."""

    step: int
    tensors: dict[str, torch.Tensor]
    slot: int
    event: Any = None
    taken_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class Snapshotter:
    """A fixed number of slots of host buffers; a slot is busy from ``acquire`` until ``release``.
    The free slots are the monitor's queue bound: no slot, no snapshot."""

    def __init__(self, model: torch.nn.Module, slots: int):
        self.model = model
        self.slots = slots
        self._buffers: list[dict[str, torch.Tensor] | None] = [None] * slots
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(slots):
            self._free.put(slot)
        self._stream = None
        self._companions: list[dict[str, torch.Tensor] | None] = [None] * slots

    def tensors(self) -> dict[str, torch.Tensor]:
        return live_tensors(self.model)

    def allocated(self) -> bool:
        return any(b is not None for b in self._buffers)

    def acquire(self, timeout: float | None = 0.0) -> int | None:
        """A free slot, waiting at most ``timeout`` seconds (0: do not wait); None when all are busy."""
        try:
            return self._free.get(block=bool(timeout), timeout=timeout or None)
        except queue.Empty:
            return None

    def give_back(self, slot: int) -> None:
        """Return a slot that was acquired but not used for a snapshot."""
        self._free.put(slot)

    def take(self, step: int, slot: int) -> Snapshot:
        """Copy the weights into ``slot`` (from ``acquire``)."""
        buffers, event = self._copy(self._buffers, slot)
        return Snapshot(step, buffers, slot, event)

    def companion(self, snap: Snapshot, step: int) -> None:
        """A second copy of the weights into the slot's companion buffers (``snap.extra['after']``):
        the step after a snapshot, so the worker sees one optimizer update (update-to-weight ratio)."""
        buffers, event = self._copy(self._companions, snap.slot)
        snap.extra.update(after=buffers, after_event=event, after_step=step)

    def _copy(self, pool: list, slot: int) -> tuple[dict[str, torch.Tensor], Any]:
        live = self.tensors()
        buffers = pool[slot]
        if buffers is None or buffers.keys() != live.keys() or any(
                buffers[n].shape != t.shape or buffers[n].dtype != t.dtype for n, t in live.items()):
            buffers = {n: torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda) for n, t in live.items()}
            pool[slot] = buffers
        event = None
        with torch.no_grad():
            cuda = [t for t in live.values() if t.is_cuda]
            if cuda:
                device = cuda[0].device
                if self._stream is None:
                    self._stream = torch.cuda.Stream(device=device)
                train_stream = torch.cuda.current_stream(device)
                self._stream.wait_stream(train_stream)
                with torch.cuda.stream(self._stream):
                    for n, t in live.items():
                        buffers[n].copy_(t.detach(), non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(self._stream)
                train_stream.wait_event(event)  # GPU-side: later in-place updates wait for the copies
            else:
                for n, t in live.items():
                    buffers[n].copy_(t.detach())
        return buffers, event

    def release(self, snapshot: Snapshot) -> None:
        self._free.put(snapshot.slot)
