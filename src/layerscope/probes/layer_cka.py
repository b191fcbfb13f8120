"""Debiased linear CKA between the same layer of two checkpoints, on the same tokens (``compare --data``).

Drift (``compare``) says how far the weights moved; CKA says whether the layer still computes the same
representation of text — a matrix can move a lot (a rotation, a rescaling) while its layer's hidden
states stay linearly equivalent, and the reverse. Both models run on identical token batches: the data
is tokenised by each model's own tokenizer and the ids must be equal, since CKA pairs token i of A with
token i of B. Layer l is the state after block l − 1 (layer 0: the embeddings' output), read by the
same block hooks as ``activations`` (:class:`~layerscope.probes.activations.BlockOutputs`).

Every token of the data counts: one :class:`~layerscope.probes.representations.PairedCKA` per layer
takes each batch's states of both models and keeps only float64 sums, so memory is one batch's states
plus three d × d sums per layer, never the whole data. The result is stored under
``"{weights hash A}>{weights hash B}"`` (kind ``compare.cka``, params: the data's token hash and the
precision), so comparing again on the same data runs neither model, and ``report`` shows it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd

from ..errors import LayerscopeError

KIND = "compare.cka"
VERSION = 1

Progress = Callable[[int, int, str], None]


@dataclass
class LayerCKA:
    """``rows``: one row per layer — ``state`` (0: the embeddings' output, s: the output of block s − 1),
    ``layer`` (that block, as in the drift table; empty for the embeddings) and ``cka``.
    ``data``: description, token hash, token count and windows of the batches both models ran on."""

    rows: pd.DataFrame
    data: dict[str, Any]
    from_store: bool = False

    def payload(self) -> dict[str, Any]:
        return {"rows": [{"state": int(r.state), "cka": float(r.cka)} for r in self.rows.itertuples()], "data": self.data}

    @classmethod
    def from_payload(cls, payload: dict[str, Any], from_store: bool = True) -> "LayerCKA":
        return cls(_frame([(r["state"], r["cka"]) for r in payload["rows"]]), payload["data"], from_store)


def _frame(values: list[tuple[int, float]]) -> pd.DataFrame:
    frame = pd.DataFrame({"state": [s for s, _ in values], "cka": [float(v) for _, v in values]})
    frame.insert(1, "layer", pd.array([s - 1 if s > 0 else None for s in frame["state"]], dtype="Int64"))
    return frame


def layer_cka(a: Any, b: Any, data: Any = None, *, store: Any, text_field: str | None = None, seq_len: int | None = None,
              batches: int = 4, batch_size: int = 8, seed: int = 0, device: str | None = None, dtype: str | None = None,
              cache: bool = True, progress: Progress | None = None) -> LayerCKA:
    """Per-layer debiased linear CKA between checkpoints ``a`` and ``b`` on ``data`` (see the module doc).

    a, b: checkpoint paths, hub ids, Sources or RunnableModels. data: None (the default text), a path or
    a list of texts, as for ``activations``. Raises a one-line LayerscopeError when the two models do
    not read the data as the same tokens, or do not have the same number of layers."""
    from .activations import activation_data
    from .model import load_model

    ma = load_model(a, device=device, dtype=dtype, store=store)
    mb = load_model(b, device=device, dtype=dtype, store=store)
    for m in (ma, mb):
        if m.kind == "custom":
            raise LayerscopeError(f"CKA on data: {m.label} is not a transformers model")
    if ma.vocab_size != mb.vocab_size:
        raise LayerscopeError(f"CKA on data needs one tokenizer: {ma.label} has a {ma.vocab_size}-token vocabulary and "
                              f"{mb.label} a {mb.vocab_size}-token one")
    opts = dict(text_field=text_field, seq_len=seq_len, batches=batches, batch_size=batch_size, seed=seed)
    da = activation_data(ma, data, **opts)
    db = activation_data(mb, data, **opts)
    if da.hash != db.hash:
        raise LayerscopeError(f"CKA on data needs one tokenizer: {ma.label} ({da.params.get('tokenizer', '?')}) and "
                              f"{mb.label} ({db.params.get('tokenizer', '?')}) turn the data into different tokens")
    key = f"{ma.weights_hash}>{mb.weights_hash}"
    params = json.dumps({"data": da.hash, "dtype": str(ma.dtype).removeprefix("torch."), "v": VERSION}, sort_keys=True)
    stored = store.artifact(key, KIND, params) if cache else None
    if stored is not None:
        return LayerCKA.from_payload(stored)
    result = LayerCKA(_frame(_run(ma, mb, da, progress)),
                      {"description": da.description, "hash": da.hash, "tokens": int(da.input_ids.numel()),
                       **{k: v for k, v in da.params.items() if k in ("seq_len", "batches", "batch_size", "seed", "tokenizer")}})
    store.put_artifact(key, KIND, params, result.payload())
    return result


def _run(ma: Any, mb: Any, data: Any, progress: Progress | None) -> list[tuple[int, float]]:
    """Both models on every batch, the states of each layer paired into one PairedCKA."""
    from .activations import BlockOutputs, run_module
    from .representations import PairedCKA

    hooks = [BlockOutputs(ma), BlockOutputs(mb)]
    if hooks[0].n_blocks != hooks[1].n_blocks:
        for h in hooks:
            h.close()
        raise LayerscopeError(f"CKA on data: {ma.label} has {hooks[0].n_blocks} blocks and {mb.label} {hooks[1].n_blocks}")
    accs: list[PairedCKA] = []
    n = data.n_batches
    try:
        for i in range(n):
            ids = data.input_ids[i]
            states = []
            for m, h in zip((ma, mb), hooks):
                h.out.clear()
                out = run_module(m, ids, attentions=False)
                states.append(h.states(out.hidden_states))
                del out
            if len(states[0]) != len(states[1]):
                raise LayerscopeError(f"CKA on data: {ma.label} gives {len(states[0])} hidden states and {mb.label} {len(states[1])}")
            if not accs:
                accs = [PairedCKA() for _ in states[0]]
            for acc, sa, sb in zip(accs, *states):
                acc.add(sa.to(sb.device), sb)
            if progress:
                progress(i + 1, n, "cka batches")
    finally:
        for h in hooks:
            h.close()
    return [(s, acc.value()) for s, acc in enumerate(accs)]


def stored_layer_cka(a: Any, b: Any, store: Any) -> list[LayerCKA]:
    """Every per-layer CKA stored for the pair (one per dataset and precision it was computed on),
    found without running either model: what ``report`` shows beside the drift."""
    from ..sources import open_source
    from .model import weights_hash

    key = f"{weights_hash(open_source(a), store)}>{weights_hash(open_source(b), store)}"
    return [LayerCKA.from_payload(p) for p in store.artifacts(key, KIND)]
