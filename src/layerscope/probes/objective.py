"""The loss every probe refers back to: mean token cross-entropy over the probe batches.

``L(θ) = Σ_b Σ_t CE_bt(θ) / N`` over all target tokens (``labels != -100``) of all batches, so the
probes' Hessian and Fisher are those of exactly the number reported as the loss (perplexity =
exp L). A custom module's objective is ``Σ_b n_b · loss_fn(module(X_b), y_b) / Σ_b n_b`` (``loss_fn``
with mean reduction, ``n_b`` the batch's length).

Three forms of the same function, because probes need all three:

* :meth:`Objective.batch_term` — the term of batch ``b`` (already divided by N) through the module's
  own parameters: backward, double backward (exact Hessian-vector products), one batch at a time so
  memory is one micro-batch's graph.
* :meth:`Objective.functional_loss` — ``L`` as a pure function of a params dict
  (``torch.func.functional_call``), for ``torch.func.grad``/``jvp``/``vmap``.
* :meth:`Objective.per_example_loss` — one example's mean token loss as a function of (params,
  example), the shape ``vmap(grad(per_example_loss), in_dims=(None, 0))`` wants for per-example
  gradients (the Fisher).

Logits dominate memory at large vocabularies (``B × T × V`` floats, kept for backward): when one
micro-batch's logits would pass ``chunk_bytes``, the LM head and the cross-entropy run over chunks
of positions under activation checkpointing, so only one chunk's logits exist at a time, in
backward and double backward alike. That is done for the decoder families whose head is a plain
linear map of the body's last hidden state; others compute full logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import LayerscopeError
from .data import IGNORE, ProbeData
from .model import RunnableModel

#: Families whose causal LM computes ``logits = lm_head(body(ids).last_hidden_state)`` exactly
#: (no logit scaling or soft-capping), so the head can run in chunks.
PLAIN_HEAD_FAMILIES = ("gpt2", "nanogpt", "llama", "mistral", "qwen2", "qwen3", "gpt_neox", "phi3", "mixtral", "gemma",
                       "opt", "gptj", "phi", "olmo", "olmo2", "stablelm", "starcoder2", "smollm3")
DEFAULT_CHUNK_BYTES = 256 << 20


@dataclass
class LossResult:
    loss: float  # mean token cross-entropy (nats)
    perplexity: float
    tokens: int  # target tokens (or examples, for a custom loss)
    batches: int


class TokenLoss(torch.nn.Module):
    """``(input_ids, labels) -> (Σ CE, number of targets)`` around an LM, chunking the head when asked."""

    def __init__(self, lm: torch.nn.Module, family: str, chunk_positions: int | None = None):
        super().__init__()
        self.lm = lm
        self.chunk_positions = chunk_positions
        prefix = getattr(lm, "base_model_prefix", "")
        self.splittable = (family in PLAIN_HEAD_FAMILIES and prefix and hasattr(lm, prefix)
                           and lm.get_output_embeddings() is not None)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = (labels != IGNORE).sum()
        t = input_ids.shape[-1]
        if not self.chunk_positions or self.chunk_positions >= t or not self.splittable:
            logits = self.lm(input_ids=input_ids).logits
            return _ce_sum(logits, labels), count
        body = getattr(self.lm, self.lm.base_model_prefix)
        head = self.lm.get_output_embeddings()
        hidden = body(input_ids=input_ids)[0]
        total = hidden.new_zeros((), dtype=torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype)
        for s in range(0, t, self.chunk_positions):
            h, y = hidden[:, s:s + self.chunk_positions], labels[:, s:s + self.chunk_positions]
            if torch.is_grad_enabled():
                total = total + torch.utils.checkpoint.checkpoint(_head_ce, head, h, y, use_reentrant=False)
            else:
                total = total + _head_ce(head, h, y)
        return total, count


def _head_ce(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return _ce_sum(head(hidden), labels)


def _ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # a softmax over 50k entries in half precision loses the small ones
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")


class Objective:
    """The mean loss of ``model`` over ``data`` (see the module docstring)."""

    def __init__(self, model: RunnableModel, data: ProbeData, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.model, self.data = model, data
        if model.kind == "custom":
            if data.pairs is None:
                raise LayerscopeError("a module with its own loss_fn needs data=[(inputs, targets), ...]")
            self.counts = [_batch_len(x) for x, _ in data.pairs]
            self.token_loss = None
        else:
            model.require_lm_head("this probe")
            if data.input_ids is None:
                raise LayerscopeError(f"{model.label}: needs token batches, got (inputs, targets) pairs")
            if model.vocab_size is not None and int(data.input_ids.max()) >= model.vocab_size:
                raise LayerscopeError(f"tokenizer mismatch: token id {int(data.input_ids.max())} is outside the model's "
                                      f"{model.vocab_size}-token vocabulary")
            self.counts = [int((data.labels[b] != IGNORE).sum()) for b in range(data.n_batches)]
            b, t = data.input_ids.shape[1:]
            itemsize = 4 if model.dtype in (torch.float16, torch.bfloat16) else torch.empty((), dtype=model.dtype).element_size()
            per_position = b * (model.vocab_size or 1) * itemsize
            chunk = max(1, chunk_bytes // per_position) if per_position * t > chunk_bytes else None
            self.token_loss = TokenLoss(model.module, model.anatomy.family, chunk)
        self.total = sum(self.counts)
        if self.total == 0:
            raise LayerscopeError("data: no targets to compute a loss on")
        self.micro_batch: int | None = None  # set by probes that split batches (OOM fallback)

    @property
    def n_batches(self) -> int:
        return self.data.n_batches

    def _to_device(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(self.model.device, non_blocking=True)
        if isinstance(x, (list, tuple)):
            return type(x)(self._to_device(v) for v in x)
        if isinstance(x, dict):
            return {k: self._to_device(v) for k, v in x.items()}
        return x

    def pieces(self, b: int) -> list[tuple[Any, Any]]:
        """Batch ``b`` as micro-batches ``(inputs, targets)`` of ``micro_batch`` rows (all when None)."""
        x, y = self.data.batch(b)
        n = _batch_len(x)
        step = self.micro_batch or n
        out = []
        for s in range(0, n, step):
            xs, ys = _rows(x, s, s + step), _rows(y, s, s + step)
            out.append((xs, ys))
        return out

    # -- the loss through the module's own parameters -------------------------------------------
    def term(self, inputs: Any, targets: Any) -> torch.Tensor:
        """Contribution of one (micro-)batch to L: its loss sum divided by the total count N."""
        inputs, targets = self._to_device(inputs), self._to_device(targets)
        if self.token_loss is not None:
            loss_sum, _ = self.token_loss(inputs, targets)
            return loss_sum / self.total
        return self.model.loss_fn(self.model.module(inputs), targets) * (_batch_len(inputs) / self.total)

    def batch_term(self, b: int) -> torch.Tensor:
        return sum(self.term(x, y) for x, y in self.pieces(b))

    def evaluate(self) -> LossResult:
        """L and perplexity exp(L) over every batch (no graph kept)."""
        total = 0.0
        with torch.no_grad():
            for b in range(self.n_batches):
                total += float(self.batch_term(b))
        return LossResult(total, math.exp(total) if total < 700 else math.inf, self.total, self.n_batches)

    # -- the same loss as pure functions of a params dict (torch.func) --------------------------
    def _call(self, params: dict[str, torch.Tensor], inputs: Any, targets: Any) -> torch.Tensor:
        state = {**self.model.constants, **params}
        if self.token_loss is not None:
            loss_sum, _ = torch.func.functional_call(self.token_loss, {"lm." + k: v for k, v in state.items()},
                                                     (inputs, targets))
            return loss_sum
        out = torch.func.functional_call(self.model.module, state, (inputs,))
        return self.model.loss_fn(out, targets) * _batch_len(inputs)

    def functional_loss(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """L(params) over all batches; ``params`` maps (some of) the probe parameters' names to tensors."""
        full = {**self.model.params, **params}
        return sum(self._call(full, *map(self._to_device, self.data.batch(b))) for b in range(self.n_batches)) / self.total

    def per_example_loss(self, params: dict[str, torch.Tensor], example: tuple[Any, Any]) -> torch.Tensor:
        """One example's loss: the mean CE over its targets (tokens), or ``loss_fn`` on a batch of one.

        ``example`` is (inputs, targets) without the batch dimension, as ``vmap`` hands it over."""
        x, y = example
        full = {**self.model.params, **params}
        xb = _unsqueeze(x)
        yb = _unsqueeze(y)
        if self.token_loss is not None:
            state = {**self.model.constants, **full}
            logits = torch.func.functional_call(self.model.module, state, (), {"input_ids": xb}).logits
            mask = (yb != IGNORE)
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float() if logits.dtype in (torch.float16, torch.bfloat16)
                                 else logits.reshape(-1, logits.shape[-1]), torch.where(mask, yb, 0).reshape(-1),
                                 reduction="none")
            return (ce * mask.reshape(-1)).sum() / mask.sum().clamp(min=1)
        out = torch.func.functional_call(self.model.module, {**self.model.constants, **full}, (xb,))
        return self.model.loss_fn(out, yb)

    def examples(self, b: int) -> tuple[Any, Any]:
        """Batch ``b`` on the device, to vmap ``per_example_loss`` over (dim 0 of each)."""
        return tuple(self._to_device(t) for t in self.data.batch(b))

    def example_weights(self, b: int) -> torch.Tensor:
        """Each example's share of L: its target count / N (tokens) or 1 / N (custom), so that
        L = Σ_examples weight · per_example_loss."""
        x, y = self.data.batch(b)
        if self.token_loss is not None:
            return (y != IGNORE).sum(dim=-1).to(torch.float64) / self.total
        return torch.full((_batch_len(x),), 1.0 / self.total, dtype=torch.float64)


def _batch_len(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return int(x.shape[0])
    if isinstance(x, (list, tuple)) and x:
        return _batch_len(x[0])
    if isinstance(x, dict) and x:
        return _batch_len(next(iter(x.values())))
    raise LayerscopeError(f"data: cannot tell the batch size of {type(x).__name__}")


def _rows(x: Any, s: int, e: int) -> Any:
    if isinstance(x, torch.Tensor):
        return x[s:e]
    if isinstance(x, (list, tuple)):
        return type(x)(_rows(v, s, e) for v in x)
    if isinstance(x, dict):
        return {k: _rows(v, s, e) for k, v in x.items()}
    return x


def _unsqueeze(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.unsqueeze(0)
    if isinstance(x, (list, tuple)):
        return type(x)(_unsqueeze(v) for v in x)
    if isinstance(x, dict):
        return {k: _unsqueeze(v) for k, v in x.items()}
    return x
