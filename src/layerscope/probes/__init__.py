"""Probes: the model run on data (curvature, Fisher, landscapes, gradients, activations).

Every probe stands on three pieces, built once per (model, data) and shared:

* :func:`load_model` (``model.py``) -> :class:`RunnableModel`: a Hugging Face checkpoint (folder or hub
  id; causal LM, masked LM or bare model, never remote code), a nanoGPT ``ckpt.pt`` mapped onto GPT-2,
  or a live ``nn.Module`` (with ``loss_fn`` for non-LMs: :func:`from_module`). It carries
  ``module``, ``kind`` (causal / masked / base / custom), ``params`` (name -> Parameter: what probes
  differentiate, tied weights once), ``anatomy`` (roles, layers, fused slices of those same names),
  ``head_slices(name)`` (q/k/v/o per-head selectors, GQA-aware; they partition the tensor),
  ``checkpoint_names`` and ``weights_hash``. ``require_lm_head()`` raises the one-line error a model
  without an LM head gets from loss-based probes.
* :func:`load_data` (``data.py``) -> :class:`ProbeData`: ``input_ids``/``labels`` of shape
  (batches, batch_size, seq_len) (labels -100 where there is no target), or the user's
  ``(inputs, targets)`` pairs for a custom module; ``hash`` is the content hash of the tokens.
* :class:`Objective` (``objective.py``): the mean token cross-entropy L over all batches, as
  ``batch_term(b)`` through the module's parameters (backward / double backward, one micro-batch at a
  time; the LM head is chunked over positions at large vocabularies), ``functional_loss(params)``
  and ``per_example_loss(params, example)`` for ``torch.func`` (``vmap(grad(...))``), with
  ``example_weights(b)`` such that L = Σ weight · per_example_loss; ``evaluate()`` gives the loss and
  perplexity.

A probe's store key is (model.weights_hash, data.hash, probe name, its parameters):
:func:`probe_key` builds it, so no probe ever runs twice on the same inputs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Resolved on first use (PEP 562), so that ``layerscope --help`` can import the probes' CLI pieces
# (e.g. ``probes.fisher_cli``) without importing torch.
_LAZY = {"ProbeData": ".data", "default_text": ".data", "from_pairs": ".data", "load_data": ".data",
         "make_batches": ".data", "read_texts": ".data", "HeadSlice": ".model", "RunnableModel": ".model",
         "from_module": ".model", "load_model": ".model", "LossResult": ".objective", "Objective": ".objective"}


def __getattr__(name: str) -> Any:
    try:
        module = importlib.import_module(_LAZY[name], __name__)
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(module, name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from .data import ProbeData
    from .model import RunnableModel


def probe_key(model: "RunnableModel", data: "ProbeData") -> str:
    """The store key's content part: weights and data hashes (probe name and parameters go beside it)."""
    return f"{model.weights_hash}:{data.hash}"


__all__ = ["HeadSlice", "LossResult", "Objective", "ProbeData", "RunnableModel", "default_text", "from_module",
           "from_pairs", "load_data", "load_model", "make_batches", "probe_key", "read_texts"]
