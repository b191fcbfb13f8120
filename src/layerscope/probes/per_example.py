"""Per-example gradients: ``vmap(grad(per_example_loss))`` over the examples of a batch, in chunks.

A Python loop of one backward per example is the slow reference (``bench/bench_fisher.py``), not
the method: ``torch.func`` batches the examples through one forward and one backward, so the
matrix products run at batch width.

Memory: a chunk of ``n`` examples holds ``n`` parameter-sized gradients plus the chunk's
activations (its logits dominate at large vocabularies). ``chunk_rows`` turns a byte budget into a
row count with the estimate below; on CUDA out-of-memory the chunk is halved and retried, and the
rows actually used are recorded (they change memory and time, never the result).

Labels: ``data`` uses the batch's own targets (empirical Fisher); ``sample`` draws each target
from the model's own predictive distribution (Monte-Carlo true Fisher). Draws come from one
uniform per target position made up front for the whole batch with a generator seeded by (seed,
sample, batch), turned into a label by inverse CDF, so a result never depends on the chunking, on
the device, or on a run having been interrupted and resumed.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterator, Sequence

import torch

from ..errors import LayerscopeError
from .data import IGNORE
from .objective import Objective, _batch_len, _rows

DEFAULT_MEMORY = 1 << 30


def is_categorical(objective: Objective) -> bool:
    """Whether the model's outputs are logits of a categorical distribution over the targets (token
    LMs; custom modules whose ``loss_fn`` is cross-entropy), so labels can be sampled from it."""
    if objective.token_loss is not None:
        return True
    fn = objective.model.loss_fn
    return isinstance(fn, torch.nn.CrossEntropyLoss) or fn is torch.nn.functional.cross_entropy


def example_bytes(objective: Objective, names: Sequence[str]) -> int:
    """Estimated bytes one example costs inside a vmapped chunk: three parameter-sized buffers
    (its gradient and the backward's temporaries) plus activations: 4 copies of its logits and
    ~40 d_model-wide vectors per position per layer (a transformer block's saved tensors); for a
    custom module, 64 copies of its input."""
    model = objective.model
    item = 4 if model.dtype in (torch.float16, torch.bfloat16, torch.float32) else 8
    p = sum(model.params[n].numel() for n in names)
    x, _ = objective.data.batch(0)
    if objective.token_loss is not None:
        t = int(x.shape[-1])
        d = model.anatomy.dims
        acts = 4 * t * (model.vocab_size or 1) + 40 * t * (d.d_model or 1) * (d.n_layers or 1)
    else:
        first = x if isinstance(x, torch.Tensor) else None
        acts = 64 * (first[0].numel() if first is not None and first.dim() else 1)
    return item * (3 * p + acts)


def chunk_rows(objective: Objective, names: Sequence[str], memory: int) -> int:
    return max(1, int(memory // max(1, example_bytes(objective, names))))


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def batch_uniforms(objective: Objective, b: int, seed: int, sample: int) -> torch.Tensor:
    """One U(0,1) per target slot of batch ``b`` (shape of its targets), seeded by (seed, sample, b)."""
    _, y = objective.data.batch(b)
    gen = torch.Generator().manual_seed(_seed(seed, sample, b))
    return torch.rand(tuple(y.shape), generator=gen, dtype=torch.float64)


def sample_labels(objective: Objective, inputs: Any, targets: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Targets drawn from the model's predictive distribution by inverse CDF of ``uniforms`` (shape
    (draws, *targets.shape): one forward, several draws); positions without a target keep -100."""
    model = objective.model
    with torch.no_grad():
        if objective.token_loss is not None:
            logits = model.module(input_ids=inputs).logits
        else:
            logits = model.module(inputs)
        cdf = torch.softmax(logits.double(), dim=-1).cumsum(-1)
        u = uniforms.to(cdf.device).unsqueeze(-1) * cdf[..., -1:].unsqueeze(0)
        drawn = torch.searchsorted(cdf.unsqueeze(0).expand(u.shape[0], *cdf.shape).contiguous(), u)
        drawn = drawn.squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
    if objective.token_loss is not None:
        drawn = torch.where(targets.unsqueeze(0) != IGNORE, drawn, torch.full_like(drawn, IGNORE))
    return drawn.to(targets.dtype)


def _repeat(x: Any, times: int) -> Any:
    if isinstance(x, torch.Tensor):
        return x.repeat(times, *([1] * (x.dim() - 1))) if times > 1 else x
    if isinstance(x, (list, tuple)):
        return type(x)(_repeat(v, times) for v in x)
    if isinstance(x, dict):
        return {k: _repeat(v, times) for k, v in x.items()}
    return x


class PerExampleGradients:
    """Yields, batch by batch and chunk by chunk, ``(weights, grads)``: each example's share of the
    loss (Σ over all batches = 1) and ``{name: (n, *shape)}`` gradients of its own loss."""

    def __init__(self, objective: Objective, names: Sequence[str] | None = None, *, memory: int = DEFAULT_MEMORY,
                 rows: int | None = None):
        self.objective = objective
        model = objective.model
        self.names = list(names) if names is not None else list(model.params)
        self.rows = rows or chunk_rows(objective, self.names, memory)
        self.used_rows = self.rows
        self.examples = 0
        self._grad = torch.func.vmap(torch.func.grad(self._loss), in_dims=(None, 0))

    def _loss(self, params: dict[str, torch.Tensor], example: tuple[Any, Any]) -> torch.Tensor:
        return self.objective.per_example_loss(params, example)

    def params(self) -> dict[str, torch.Tensor]:
        return {n: self.objective.model.params[n].detach() for n in self.names}

    def batch(self, b: int, *, labels: str = "data", seed: int = 0, samples: Sequence[int] = (0,),
              fixed_labels: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """The chunks of batch ``b``. ``labels``: ``data`` or ``sample`` (see the module docstring);
        with ``sample``, every example appears once per draw in ``samples`` (rows draw-major, each
        with its example's weight: divide by the number of draws to average). ``fixed_labels``: use
        these targets instead (the exact Fisher's enumeration of classes)."""
        obj = self.objective
        x, y = obj.data.batch(b)
        weights = obj.example_weights(b)
        n = _batch_len(x)
        draws = list(samples) if labels == "sample" else [0]
        uniforms = torch.stack([batch_uniforms(obj, b, seed, s) for s in draws]) if labels == "sample" else None
        params = self.params()
        start = 0
        while start < n:
            end = min(n, start + max(1, self.used_rows // len(draws)))
            xs, ys = obj._to_device(_rows(x, start, end)), obj._to_device(_rows(y, start, end))
            if fixed_labels is not None:
                ys = obj._to_device(fixed_labels[start:end])
            try:
                w = weights[start:end]
                if uniforms is not None:
                    ys = sample_labels(obj, xs, ys, uniforms[:, start:end]).reshape(-1, *ys.shape[1:])
                    xs, w = _repeat(xs, len(draws)), w.repeat(len(draws))
                grads = self._grad(params, (xs, ys))
            except torch.cuda.OutOfMemoryError:
                if self.used_rows == 1:
                    raise LayerscopeError("CUDA out of memory with one example per chunk: run with --device cpu") from None
                self.used_rows = max(1, self.used_rows // 2)
                torch.cuda.empty_cache()
                continue
            self.examples += end - start
            yield w, grads
            start = end


def flat(grads: dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """(n, P) rows of per-example gradients in ``names`` order."""
    return torch.cat([grads[nm].reshape(grads[nm].shape[0], -1) for nm in names], dim=1)


Progress = Callable[[str, int, int], None]
