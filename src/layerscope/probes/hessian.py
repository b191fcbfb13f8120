"""The Hessian of the probe loss as a linear operator: exact Hessian-vector products, no matrix.

``H v = ∇(∇L · v)``: one backward with ``create_graph=True`` and one more backward through it (double
backward), summed over the batches one micro-batch at a time, so memory is one micro-batch's graph
(about 2-3× a training step's activations) plus a few parameter-sized vectors. An HVP costs about two
to three gradients (``bench/bench_hessian.py`` measures it).

An operator may be restricted to a block of parameters (a layer, a weight type): it then applies
``H_BB``, the Hessian of L with respect to those parameters with the others held fixed, and only
differentiates with respect to them.

On CUDA out-of-memory the micro-batch is halved and the batch retried; ``micro_batch`` records what
was used (it changes the memory, never the result).

When the data is a single micro-batch, the first-order graph (∇L with ``create_graph``) is built once
and kept, so each further product is one backward through it (what PyHessian does for one batch);
with several batches it is rebuilt per batch per product, since keeping every batch's graph would
cost memory proportional to the data.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import LayerscopeError
from .objective import Objective


class HessianOperator:
    """``matvec(v)`` = H v for flat vectors over ``names`` (all probe parameters by default)."""

    def __init__(self, objective: Objective, names: Sequence[str] | None = None,
                 on_hvp: Callable[[], None] | None = None):
        self.objective = objective
        model = objective.model
        self.names = list(names) if names is not None else list(model.params)
        unknown = [n for n in self.names if n not in model.params]
        if unknown:
            raise LayerscopeError(f"not a probe parameter: {unknown[0]}")
        self.params = [model.params[n] for n in self.names]
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.dim = sum(self.sizes)
        self.dtype = model.dtype if model.dtype in (torch.float32, torch.float64) else torch.float32
        self.device = model.device
        self.hvps = 0
        self.gradients = 0
        self.on_hvp = on_hvp
        self._graph: tuple[torch.Tensor, ...] | None = None  # kept ∇L of a single-piece objective

    # -- flat <-> per-parameter ----------------------------------------------------------------
    def split(self, v: torch.Tensor) -> list[torch.Tensor]:
        return [t.view(s).to(p.dtype) for t, s, p in zip(v.split(self.sizes), self.shapes, self.params)]

    def flat(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1).to(self.dtype) for t in tensors])

    def block_slices(self, groups: dict[str, Sequence[str]]) -> dict[str, list[slice]]:
        """Where each group's parameters sit in the flat vector."""
        offsets, o = {}, 0
        for n, s in zip(self.names, self.sizes):
            offsets[n] = slice(o, o + s)
            o += s
        return {g: [offsets[n] for n in ns if n in offsets] for g, ns in groups.items()}

    # -- products ------------------------------------------------------------------------------
    def _each_piece(self, fn: Callable[[torch.Tensor], list[torch.Tensor]]) -> list[torch.Tensor]:
        """Σ over batches and micro-batches of fn(term), halving the micro-batch on CUDA OOM."""
        total = [torch.zeros(s, dtype=p.dtype, device=p.device) for s, p in zip(self.shapes, self.params)]
        obj = self.objective
        for b in range(obj.n_batches):
            while True:
                try:
                    parts = [fn(obj.term(x, y)) for x, y in obj.pieces(b)]
                    break
                except torch.cuda.OutOfMemoryError:
                    rows = obj.micro_batch or _rows_of(obj, b)
                    if rows <= 1:
                        raise LayerscopeError("CUDA out of memory even with a micro-batch of 1 sequence: use "
                                              "--device cpu or a shorter --seq-len") from None
                    obj.micro_batch = max(1, rows // 2)
                    torch.cuda.empty_cache()
            for part in parts:
                for t, g in zip(total, part):
                    t.add_(g)
        return total

    def matvec_tensor(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat torch vector (on the operator's device, in its dtype)."""
        vs = self.split(v.to(self.device))
        obj = self.objective
        if obj.n_batches == 1 and len(obj.pieces(0)) == 1:
            try:
                with torch.enable_grad():
                    if self._graph is None:
                        self._graph = torch.autograd.grad(obj.term(*obj.pieces(0)[0]), self.params, create_graph=True)
                    out = self.flat(torch.autograd.grad(self._graph, self.params, grad_outputs=vs, retain_graph=True))
                self.hvps += 1
                if self.on_hvp:
                    self.on_hvp()
                return out
            except torch.cuda.OutOfMemoryError:
                self._graph = None  # too big to keep: split the batch and recompute per product
                obj.micro_batch = max(1, _rows_of(obj, 0) // 2)
                torch.cuda.empty_cache()

        def hvp(loss: torch.Tensor) -> list[torch.Tensor]:
            grads = torch.autograd.grad(loss, self.params, create_graph=True)
            return list(torch.autograd.grad(grads, self.params, grad_outputs=vs))

        with torch.enable_grad():
            out = self.flat(self._each_piece(hvp))
        self.hvps += 1
        if self.on_hvp:
            self.on_hvp()
        return out

    def gradient(self) -> torch.Tensor:
        """∇L as a flat vector (one gradient: the baseline an HVP is compared with)."""
        with torch.enable_grad():
            out = self.flat(self._each_piece(lambda loss: list(torch.autograd.grad(loss, self.params))))
        self.gradients += 1
        return out

    def matvec(self, v: np.ndarray) -> np.ndarray:
        """H v for NumPy vectors (float64 in and out): what ``scipy.sparse.linalg`` calls."""
        t = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).reshape(-1)).to(self.dtype)
        return self.matvec_tensor(t).double().cpu().numpy()

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (e.g. for ``eigsh``)."""
        from scipy.sparse.linalg import LinearOperator

        return LinearOperator((self.dim, self.dim), matvec=self.matvec, rmatvec=self.matvec, dtype=np.float64)


def _rows_of(obj: Objective, b: int) -> int:
    x, _ = obj.data.batch(b)
    from .objective import _batch_len

    return _batch_len(x)
