"""``layerscope.activations(...)``: what the model does on text, from one forward pass per batch.

Each batch runs once, with the attention probabilities (eager attention, ``output_attentions``), the
hidden states, each block's output (forward hooks on the anatomy's blocks: the residual stream before
the final norm) and each MLP's neuron activations (forward pre-hooks on the anatomy's ``mlp.down``
modules). Everything is reduced before the next batch (``head_behaviour``, ``lens``,
``representations``, ``neurons``), so memory is bounded by one batch plus O(layers × d²) running sums.
One more small forward pass on random tokens repeated twice gives the induction scores and the
in-context-learning loss drop.

The result is stored under (weights hash : data hash, "activations", options), so a second run on the
same model and data reads it back; the per-head table is joined with ``heads``' weight-based QK/OV
metrics (same (layer, head) rows).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from ..config import Config
from ..errors import LayerscopeError
from .data import IGNORE, ProbeData, load_data, load_tokenizer, make_batches, token_hash
from .head_behaviour import (SINK_EPS, HeadAccumulator, icl_loss_drop, induction_stripe, repeated_random_tokens,
                             layer_scores, score_masks)
from .lens import LensAccumulator, find_lens
from .model import RunnableModel, load_model
from .neurons import NeuronAccumulator, token_contexts
from .representations import RepresentationAccumulator, cka_matrix
from .workspace import Workspace

Progress = Callable[[str, int, int], None]
VERSION = "1"
HEAD_RULE = 0.5  # a head is called previous-token / induction / duplicate-token when its score ≥ this


@dataclass
class ActivationOptions:
    cka_tokens: int = 512  # token positions sampled for CKA (same positions in every layer)
    induction_half: int = 50  # length of the random sequence that is repeated (capped by the model's positions)
    induction_seqs: int = 8
    neuron_threshold: float = 0.0
    neuron_top_k: int = 5
    neurons_shown: int = 8
    sink_eps: float = SINK_EPS
    seed: int = 0

    def key(self) -> str:
        return json.dumps({**self.__dict__, "version": VERSION}, sort_keys=True)


@dataclass
class ActivationsResult:
    model: RunnableModel
    data: ProbeData
    heads: pd.DataFrame  # one row per (layer, head): behaviour scores, joined with weight metrics
    lens: pd.DataFrame | None  # one row per layer (0 = embeddings)
    representations: pd.DataFrame  # one row per layer
    cka: np.ndarray  # (layers + 1)²
    neuron_layers: pd.DataFrame
    neuron_examples: list[dict]
    dead_neurons: list[tuple[int, int]]
    summary: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    cka_other: pd.DataFrame | None = None  # per-layer CKA with the same layer of another checkpoint
    seconds: float = 0.0
    from_store: bool = False

    def to_dict(self) -> dict[str, Any]:
        def records(frame):
            return None if frame is None else frame.replace({np.nan: None}).to_dict(orient="records")

        return {"model": self.model.label, "weights_hash": self.model.weights_hash,
                "data": {"description": self.data.description, "hash": self.data.hash, **self.data.params},
                "summary": self.summary, "heads": records(self.heads), "lens": records(self.lens),
                "representations": records(self.representations), "cka": np.asarray(self.cka).tolist(),
                "neuron_layers": records(self.neuron_layers), "neuron_examples": self.neuron_examples,
                "dead_neurons": [list(t) for t in self.dead_neurons], "notes": self.notes,
                "cka_other": records(self.cka_other), "seconds": self.seconds}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        if path.suffix.lower() != ".json":
            raise LayerscopeError(f"--out must be a .json file, got {path}")
        from ..views import write_json

        return write_json(self.to_dict(), path, default=str)


# -- data -------------------------------------------------------------------------------------------
def activation_data(model: RunnableModel, data: Any = None, *, text_field: str | None = None, seq_len: int | None = None,
                    batches: int = 4, batch_size: int = 8, seed: int = 0) -> ProbeData:
    """Batches of real text. Causal LMs: the probes' usual windows (targets for the lens). Encoders
    (masked LMs and bare models such as sentence encoders): unmasked windows between CLS and SEP,
    since attention and representations should be read on the text itself; no targets."""
    if isinstance(data, ProbeData) or model.kind in ("causal", "custom"):
        return load_data(model, data, text_field=text_field, seq_len=seq_len, batches=batches,
                         batch_size=batch_size, seed=seed)
    from .data import DEFAULT_SEQ_LEN, documents

    docs, description = documents(data, text_field)
    seq_len = seq_len or min(DEFAULT_SEQ_LEN, model.max_positions or DEFAULT_SEQ_LEN)
    if model.max_positions and seq_len > model.max_positions:
        raise LayerscopeError(f"--seq-len {seq_len} is longer than the model's {model.max_positions} positions")
    tok = load_tokenizer(model.tokenizer_dir, model.vocab_size, model.label)
    specials = [t for t in (tok.cls_id, tok.sep_id) if t is not None]
    body = make_batches(docs, tok, kind="causal", seq_len=seq_len - len(specials), batches=batches,
                        batch_size=batch_size, seed=seed, vocab_size=model.vocab_size, description=description)
    ids = body.input_ids
    parts = [ids]
    if tok.cls_id is not None:
        parts.insert(0, torch.full((*ids.shape[:2], 1), tok.cls_id, dtype=ids.dtype))
    if tok.sep_id is not None:
        parts.append(torch.full((*ids.shape[:2], 1), tok.sep_id, dtype=ids.dtype))
    ids = torch.cat(parts, dim=-1)
    labels = torch.full_like(ids, IGNORE)
    params = {**body.params, "kind": "encoder text (unmasked)", "seq_len": seq_len}
    return ProbeData(ids, labels, token_hash(ids, labels), description, 0, params=params)


def token_decoder(model: RunnableModel) -> Callable[[list[int]], str]:
    """ids -> text through the model's tokenizer; bytes for a 256-token vocabulary without one."""
    d = model.tokenizer_dir
    if d is not None and any((d / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model")):
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(d), trust_remote_code=False)
            return lambda ids: tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        except Exception:
            pass
    if model.vocab_size == 256:
        return lambda ids: bytes(ids).decode("utf-8", errors="replace")
    return lambda ids: " ".join(f"#{i}" for i in ids)


# -- where to hook ----------------------------------------------------------------------------------
#: the behaviour columns of an empty head table (a model without attention probabilities)
HEAD_COLUMNS = ["layer", "head", "prev_token", "duplicate_token", "induction_text", "first_token_share",
                "sink_position_rate", "attention_entropy"]


def find_blocks(model: RunnableModel) -> tuple[str | None, list[torch.nn.Module]]:
    """The ModuleList of transformer blocks: the one whose item i holds the anatomy's layer-i tensors
    (the encoder's, for an encoder-decoder: it is the stack ``run_module`` runs)."""
    n = model.anatomy.dims.n_layers or 0
    layer0 = [name for name, e in model.anatomy.entries.items() if e.layer == 0]
    modules = list(model.module.named_modules())
    if encoder_of(model) is not None:
        modules.sort(key=lambda item: "encoder" not in item[0])  # stable: the encoder's stack first
    for name, mod in modules:
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n and n and \
                any(p.startswith(f"{name}.0.") for p in layer0):
            return name, list(mod)
    return None, []


class BlockOutputs:
    """Forward hooks on the anatomy's blocks that keep each block's output for the current forward
    pass: the residual stream before the final norm (``hidden_states[-1]`` of some models has the final
    norm applied, so the hooks, not ``hidden_states``, define the layers' states)."""

    def __init__(self, model: RunnableModel):
        self.name, blocks = find_blocks(model)
        self.n_blocks = len(blocks)
        self.out: dict[int, torch.Tensor] = {}
        self.handles = [b.register_forward_hook(
            lambda mod, args, out, i=i: self.out.__setitem__(i, out[0] if isinstance(out, (tuple, list)) else out))
            for i, b in enumerate(blocks)]

    def states(self, hidden_states: Any) -> list[torch.Tensor]:
        """Layer 0: the embeddings' output (``hidden_states[0]``); layer l: the output of block l − 1."""
        if not self.out:
            return list(hidden_states)
        return [hidden_states[0]] + [self.out[i] for i in range(len(self.out))]

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def find_mlp_down(model: RunnableModel) -> dict[int, torch.nn.Module]:
    """layer -> the down-projection module (its input is the layer's neuron activations)."""
    modules = dict(model.module.named_modules())
    out = {}
    for name, e in model.anatomy.entries.items():
        if e.role == "mlp.down" and e.layer is not None and e.layer not in out:
            mod = modules.get(name.rsplit(".", 1)[0])
            if mod is not None:
                out[e.layer] = mod
    return out


def forward_kwargs(module: torch.nn.Module, attentions: bool = True) -> dict[str, Any]:
    """What every probing forward passes: hidden states (and attentions), and no KV cache (nothing is
    generated; building the cache is a copy of every key and value)."""
    kwargs: dict[str, Any] = {"output_attentions": attentions, "output_hidden_states": True}
    if _takes_use_cache(type(module)):
        kwargs["use_cache"] = False
    return kwargs


@functools.lru_cache(maxsize=None)
def _takes_use_cache(cls: type) -> bool:
    """Whether ``cls.forward`` accepts ``use_cache`` (read once per class: the probes call it per batch)."""
    import inspect

    try:
        return "use_cache" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def _eager(module: torch.nn.Module) -> None:
    """Attention probabilities need an implementation that returns them."""
    config = getattr(module, "config", None)
    if config is not None and getattr(config, "_attn_implementation", "eager") != "eager":
        try:
            module.set_attn_implementation("eager")
        except Exception:
            config._attn_implementation = "eager"


# -- the collection pass ----------------------------------------------------------------------------
class Collector:
    """Hooks and accumulators for one model; ``run_batch`` does one forward pass and reduces it."""

    def __init__(self, model: RunnableModel, options: ActivationOptions, n_batches: int, batch_tokens: int):
        self.model, self.options = model, options
        self.blocks = BlockOutputs(model)
        self.blocks_name = self.blocks.name
        self.lens, self.lens_note = find_lens(model, self.blocks_name)
        if encoder_of(model) is not None:
            self.lens, self.lens_note = None, ("logit lens: skipped: encoder-decoder model (its encoder is read; "
                                               "encoder states are not next-token predictions)")
        self.heads_note: str | None = None
        self.neurons_note: str | None = None
        self.mlp = find_mlp_down(model)
        self.neuron_in: dict[int, torch.Tensor] = {}
        self.handles = []
        for layer, m in self.mlp.items():
            self.handles.append(m.register_forward_pre_hook(
                lambda mod, args, layer=layer: self.neuron_in.__setitem__(layer, args[0])))
        self.heads = HeadAccumulator()
        self.lens_acc = LensAccumulator(self.blocks.n_blocks + 1) if self.lens is not None else None
        self.reps = RepresentationAccumulator()
        self.neurons = NeuronAccumulator(options.neuron_threshold, options.neuron_top_k)
        per_batch = math.ceil(options.cka_tokens / max(n_batches, 1))
        self.cka_per_batch = min(per_batch, batch_tokens)
        self.gen = torch.Generator().manual_seed(options.seed)
        self.ws = Workspace()
        self.lens_checked = False
        self.causal: bool | None = None

    def close(self) -> None:
        self.blocks.close()
        for h in self.handles:
            h.remove()
        self.handles = []

    def forward(self, ids: torch.Tensor):
        self.blocks.out.clear()
        self.neuron_in.clear()
        return run_module(self.model, ids)

    def run_batch(self, ids: torch.Tensor, labels: torch.Tensor, offset: int) -> None:
        out = self.forward(ids)
        dev_ids = ids.to(self.model.device)
        pairs = layer_attentions(self.model, out, ids.shape[-1])
        if not pairs and self.heads_note is None:
            self.heads_note = ("attention behaviour: skipped: the model returns no attention probabilities over "
                               "its input positions (no softmax attention, or an implementation that cannot "
                               "return them)")
        if pairs:
            if self.causal is None:
                self.causal = bool((pairs[0][1][:, :, 0, 1:] == 0).all())
            masks = score_masks(dev_ids)  # once per batch, shared by every layer
            for (layer, _), scores in zip(pairs, layer_scores(tuple(a for _, a in pairs), masks,
                                                              self.options.sink_eps, self.ws)):
                self.heads.add(layer, scores)
            self.heads.sequences += ids.shape[0]
        states = self.blocks.states(out.hidden_states)
        n_tok = ids.numel()
        if any(st.shape[:-1].numel() != n_tok for st in states):
            raise LayerscopeError(f"{self.model.label}: its hidden states are not one row per input token (the "
                                  "model adds positions of its own), so they cannot be read against the text")
        picked = torch.randperm(n_tok, generator=self.gen)[: self.cka_per_batch].to(self.model.device)
        self.reps.add_layers(states, picked)
        self.neurons.tokens += n_tok
        # an MLP that sees other positions than the text's (routed expert tokens, prompt or memory
        # positions the model adds) cannot be attributed to tokens: left out, with a note
        seen = {layer: a for layer, a in self.neuron_in.items() if a.shape[:-1].numel() == n_tok}
        if len(seen) < len(self.neuron_in) and self.neurons_note is None:
            self.neurons_note = ("neurons: layers " + ", ".join(str(k) for k in sorted(set(self.neuron_in) - set(seen)))
                                 + " left out: their MLP input is not one row per input token")
        self.neurons.add_layers(seen, offset)
        if self.lens_acc is not None:
            if not self.lens_checked:
                self._check_lens(states[-1], out.logits)
            if self.lens_acc is not None:
                self.lens_acc.add_batch(self.lens, states, out.logits, labels.to(self.model.device))

    def _check_lens(self, last: torch.Tensor, logits: torch.Tensor) -> None:
        """The lens at the last layer must give the model's own logits; otherwise it is not reported."""
        self.lens_checked = True
        ref = logits[:1].float()
        try:
            with torch.no_grad():
                mine = self.lens(last[:1]).float()
        except RuntimeError:  # a norm or head that does not fit the residual stream (e.g. RemBERT's)
            mine = None
        tol = 1e-3 * max(1.0, float(ref.abs().max()))
        if mine is None or mine.shape != ref.shape or float((mine - ref).abs().max()) > tol:
            self.lens_note = ("logit lens: skipped: the final norm and LM head found for this architecture do not "
                              "reproduce its logits at the last layer")
            self.lens_acc = None



def run_module(model: RunnableModel, ids: torch.Tensor, attentions: bool = True) -> Any:
    """One forward pass that returns hidden states (and attention probabilities). Encoder-decoders run
    their encoder only: the decoder needs target text, and its states are conditioned on the encoder's,
    so the encoder is what "the model on this text" means. No KV cache: nothing reads it, and the
    caches of hybrid models (linear attention, SSM layers) fail when asked for their length."""
    module = encoder_of(model) or model.module
    with torch.no_grad():
        try:
            return module(input_ids=ids.to(model.device), **forward_kwargs(module, attentions))
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # the model's own code, not ours
            asked = "with eager attention and output_attentions" if attentions else "with output_hidden_states"
            raise LayerscopeError(f"{model.label}: its forward pass failed {asked} "
                                  f"({type(exc).__name__}: {str(exc)[:160]})") from exc


def encoder_of(model: RunnableModel) -> torch.nn.Module | None:
    """The encoder of an encoder-decoder model, else None."""
    module = model.module
    if getattr(getattr(module, "config", None), "is_encoder_decoder", False) and hasattr(module, "get_encoder"):
        return module.get_encoder()
    return None


def attentions_of(out: Any) -> tuple[torch.Tensor, ...] | None:
    """The per-layer attention probabilities, or None when the model has none to give (SSMs, FNet) or
    its attention implementation cannot return them."""
    att = getattr(out, "attentions", None)
    if not att:
        return None
    att = tuple(a if isinstance(a, torch.Tensor) and a.dim() == 4 else None for a in att)  # Pegasus-X: dicts
    return None if all(a is None for a in att) else att


def layer_attentions(model: RunnableModel, out: Any, seq: int) -> list[tuple[int, torch.Tensor]]:
    """[(layer, attention probabilities (B, H, seq, seq))] of the layers that can be scored against the
    text. Hybrids (attention beside SSM or linear-attention layers) return either None for the other
    layers or only their attention layers' tensors: then the i-th tensor belongs to the i-th layer
    that the anatomy knows has self-attention. Layers whose queries or keys are not the input
    positions (pooled, memory or prompt positions) are left out."""
    att = attentions_of(out)
    if att is None:
        return []
    layers = list(range(len(att)))
    n_layers = model.anatomy.dims.n_layers or len(att)
    if len(att) != n_layers:
        stack = "encoder" if encoder_of(model) is not None else ""
        layers = sorted({s.layer for s in model.anatomy.attention if not s.cross and s.stack in (stack, "")})
        if len(layers) != len(att):
            return []  # cannot tell which layer each tensor belongs to: better none than misplaced
    return [(layer, a) for layer, a in zip(layers, att) if a is not None and tuple(a.shape[-2:]) == (seq, seq)]


def induction_pass(model: RunnableModel, options: ActivationOptions, vocab: int, bos: int | None,
                   exclude: tuple[int, ...], pool: torch.Tensor | None = None) -> tuple[dict, dict, dict]:
    """{layer: per-head induction score} on random tokens repeated twice (layers with attention over
    the input positions), the in-context-learning loss drop (causal LMs), and the sequences' layout."""
    offset = 1 if bos is not None else 0
    half = max(2, min(options.induction_half, ((model.max_positions or 2 * options.induction_half + 1) - offset) // 2))
    ids = repeated_random_tokens(vocab, half, options.induction_seqs, options.seed, bos, exclude, pool).to(model.device)
    out = run_module(model, ids)
    scores = {layer: induction_stripe(a, half, offset).mean(0).cpu().numpy()
              for layer, a in layer_attentions(model, out, ids.shape[-1])}
    icl = icl_loss_drop(out.logits, ids, half, offset) if model.kind == "causal" and hasattr(out, "logits") else {}
    return scores, icl, {"half": half, "sequences": int(ids.shape[0]), "bos": bos}


def collect(model: RunnableModel, data: ProbeData, options: ActivationOptions,
            progress: Progress | None = None) -> Collector:
    """Run every batch through ``model`` once and reduce it (plus the random repeated-token pass)."""
    _eager(model.module)
    ids_all = data.input_ids
    n_batches, bsz, seq = ids_all.shape
    col = Collector(model, options, n_batches, bsz * seq)
    try:
        for b in range(n_batches):
            col.run_batch(ids_all[b], data.labels[b], b * bsz * seq)
            if progress:
                progress("batches", b + 1, n_batches)
    finally:
        col.close()
    col.neurons.finish()
    return col


# -- the API ----------------------------------------------------------------------------------------
def activations(model: Any, data: Any = None, *, other: Any = None, text_field: str | None = None,
                seq_len: int | None = None, batches: int = 4, batch_size: int = 8, seed: int = 0,
                device: str | None = None, dtype: str | None = None, config: Config | None = None,
                revision: str | None = None, options: ActivationOptions | None = None,
                neuron_scores: dict[int, Any] | None = None, with_heads: bool = True,
                progress: Progress | None = None) -> ActivationsResult:
    """Attention behaviour, logit lens, representations and neurons of ``model`` on ``data``.

    model: a checkpoint path, hub id, nn.Module or RunnableModel. data: None (the default text), a
    path, a list of texts, or ProbeData. other: a second checkpoint of the same architecture and
    tokenizer: per-layer CKA between the two on the same tokens. neuron_scores: layer -> per-neuron
    score (e.g. the Fisher probe's) whose top neurons are shown with their tokens too."""
    from ..store import Store

    started = time.perf_counter()
    config = config or Config()
    options = options or ActivationOptions(seed=seed)
    store = Store(config.resolved_store())
    try:
        runnable = load_model(model, device=device or config.device, dtype=dtype, revision=revision, store=store)
        if runnable.kind == "custom":
            raise LayerscopeError("activations: needs a transformers model (attention probabilities, hidden states)")
        probe_data = activation_data(runnable, data, text_field=text_field, seq_len=seq_len, batches=batches,
                                     batch_size=batch_size, seed=seed)
        key = f"{runnable.weights_hash}:{probe_data.hash}"
        params = json.dumps({"options": options.key(), "dtype": str(runnable.dtype),
                             "neuron_scores": bool(neuron_scores)}, sort_keys=True)
        stored = store.artifact(key, "activations", params) if config.cache and not neuron_scores else None
        if stored is not None:
            result = _from_payload(runnable, probe_data, stored)
        else:
            result = _compute(runnable, probe_data, options, neuron_scores, progress)
            store.put_artifact(key, "activations", params, _payload(result))
        if other is not None:
            result.cka_other = _cka_with_other(runnable, probe_data, other, store, config, device, dtype, revision,
                                               progress)
        if with_heads:
            _join_weight_heads(result, config)
    finally:
        store.close()
    result.seconds = time.perf_counter() - started
    return result


def _compute(model: RunnableModel, data: ProbeData, options: ActivationOptions, neuron_scores, progress) -> ActivationsResult:
    col = collect(model, data, options, progress)
    notes = [n for n in (col.heads_note, col.lens_note, col.neurons_note) if n]
    rows = col.heads.rows()
    heads = pd.DataFrame(rows) if rows else pd.DataFrame(columns=HEAD_COLUMNS)
    tok = None
    try:
        tok = load_tokenizer(model.tokenizer_dir, model.vocab_size, model.label)
    except LayerscopeError:
        pass
    bos = None
    if tok is not None:
        # encoders: CLS first, as in their inputs; causal LMs: the tokenizer's BOS (GPT-2's is its EOS,
        # <|endoftext|>, which TransformerLens prepends too); byte-level models: none
        bos = tok.cls_id if model.kind != "causal" else tok.eos_id
    vocab = model.vocab_size or int(data.input_ids.max()) + 1
    ind, icl, layout = (induction_pass(model, options, vocab, bos, tuple(tok.special_ids) if tok else (),
                                       torch.unique(data.input_ids)) if len(heads) else (None, {}, None))
    heads["induction"] = [float(ind[int(r.layer)][int(r.head)]) if int(r.layer) in ind else math.nan
                          for r in heads.itertuples()]
    lens = None
    summary: dict[str, Any] = {"causal_attention": col.causal, "induction_layout": layout, **icl,
                               "tokens": int(data.input_ids.numel())}
    if col.lens_acc is not None and col.lens_acc.positions:
        rows, h = col.lens_acc.rows()
        lens = pd.DataFrame(rows)
        summary["next_token_entropy"] = h
    reps = pd.DataFrame(col.reps.rows())
    samples = col.reps.samples()
    cka = cka_matrix([samples[layer] for layer in sorted(samples)]) if samples and len(samples[0]) >= 4 else np.zeros((0, 0))
    summary["cka_tokens"] = int(len(samples[0])) if samples else 0
    scores = {int(k): torch.as_tensor(v) for k, v in (neuron_scores or {}).items()}
    examples = token_contexts(col.neurons, col.neurons.pick(options.neurons_shown, scores or None), data.input_ids,
                              token_decoder(model)) if col.neurons.active else []
    neuron_layers = pd.DataFrame(col.neurons.layer_rows())
    if not col.mlp:
        moe = any(e.role.startswith("moe.") for e in model.anatomy.entries.values())
        notes.append("neurons: mixture-of-experts MLPs are not read (an expert sees only the tokens routed to it)"
                     if moe else "neurons: no MLP down-projection found in the anatomy (attention-only model?)")
    _flag_heads(heads, options)
    summary["sink_rate"] = float((heads["first_token_share"] > options.sink_eps).mean()) if len(heads) else math.nan
    return ActivationsResult(model, data, heads, lens, reps, cka, neuron_layers, examples, col.neurons.dead(),
                             summary, notes)


def _flag_heads(heads: pd.DataFrame, options: ActivationOptions) -> None:
    heads["is_prev_token_head"] = heads["prev_token"] >= HEAD_RULE
    heads["is_induction_head"] = heads["induction"] >= HEAD_RULE
    heads["is_duplicate_token_head"] = heads["duplicate_token"] >= HEAD_RULE
    heads["is_sink"] = heads["first_token_share"] > options.sink_eps


def _cka_with_other(model: RunnableModel, data: ProbeData, other: Any, store, config, device, dtype, revision,
                    progress) -> pd.DataFrame:
    """Per-layer CKA between ``model`` and ``other`` over every token of the same batches: the estimator
    of ``compare --data`` (:func:`~layerscope.probes.layer_cka.layer_cka`, stored there), so the two
    commands give one number for one pair of checkpoints on one data."""
    from .layer_cka import layer_cka

    b = load_model(other, device=device or config.device, dtype=dtype, revision=revision, store=store)
    report = (lambda done, total, what: progress(what, done, total)) if progress else None
    rows = layer_cka(model, b, data, store=store, cache=config.cache, progress=report).rows
    return pd.DataFrame({"layer": rows["state"].astype(int), "cka_with_other": rows["cka"].astype(float)}).assign(
        other=b.label)


def _join_weight_heads(result: ActivationsResult, config: Config) -> None:
    """Add ``heads``' QK/OV weight metrics to each (layer, head) row."""
    from ..weights.heads import heads as weight_heads

    if result.model.source is None or not len(result.heads):
        return
    try:
        w = weight_heads(result.model.source, config).table
    except Exception as exc:  # optional join: an unreadable layout must not lose the behaviour results
        result.notes.append(f"weight-based head metrics not joined: {type(exc).__name__}: {exc}")
        return
    if "stack" in w.columns:  # an encoder-decoder: behaviour is read on the encoder's self-attention
        w = w[(w["stack"] == "encoder") & (w.get("attention", "self") == "self")]
    keep = ["layer", "head"] + [c for c in w.columns if c.startswith(("qk_", "ov_")) and not c.endswith("_top_eigs")]
    result.heads = result.heads.drop(columns=[c for c in keep[2:] if c in result.heads]).merge(
        w[keep], on=["layer", "head"], how="left")


def _payload(r: ActivationsResult) -> dict[str, Any]:
    d = r.to_dict()
    d.pop("cka_other", None)
    return d


def _from_payload(model: RunnableModel, data: ProbeData, p: dict[str, Any]) -> ActivationsResult:
    frame = lambda rows: None if rows is None else pd.DataFrame(rows)  # noqa: E731
    heads = frame(p["heads"])
    return ActivationsResult(model, data, heads, frame(p["lens"]), frame(p["representations"]),
                             np.asarray(p["cka"], dtype=float), frame(p["neuron_layers"]), p["neuron_examples"],
                             [tuple(t) for t in p["dead_neurons"]], p["summary"], p["notes"], from_store=True)


# -- console view -----------------------------------------------------------------------------------
def print_activations(result: ActivationsResult, console: Any = None, top: int = 12) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    m, d, s = result.model, result.data, result.summary
    console.print(escape(f"{m.label}: {m.kind} model on {d.description}; {d.n_batches} batches, {s['tokens']:,} tokens "
                         f"(data hash {d.hash[:12]})" + (" — from the store" if result.from_store else "")))
    h = result.heads
    from ..weights.heads import head_label

    table = Table(title=f"attention heads on text (a behaviour is named when its score ≥ {HEAD_RULE}; "
                        f"sink: first-token share > {SINK_EPS})", title_justify="left",
                  caption="prev, dup, ind·text: TransformerLens detect_head scores on the data; ind·rnd: induction "
                          "on repeated random tokens; sink: first-token share; H: attention entropy (nats)",
                  caption_justify="left")
    cols = {"prev_token": "prev", "duplicate_token": "dup", "induction_text": "ind·text", "induction": "ind·rnd",
            "first_token_share": "sink", "attention_entropy": "H"}
    table.add_column("head", no_wrap=True)
    for header in cols.values():
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("named")
    ranked = h.assign(_k=h[["prev_token", "induction", "duplicate_token", "first_token_share"]].max(axis=1))
    for r in ranked.sort_values("_k", ascending=False).head(top).itertuples():
        named = [n for n, f in (("prev-token", r.is_prev_token_head), ("induction", r.is_induction_head),
                                ("dup-token", r.is_duplicate_token_head), ("sink", r.is_sink)) if f]
        table.add_row(head_label(r.layer, r.head), *[f"{getattr(r, c):.3f}" for c in cols], ", ".join(named) or "—")
    console.print(table)
    if "icl_loss_drop" in s:
        console.print(f"random tokens repeated twice (half {s['induction_layout']['half']}): loss {s['loss_first_half']:.3f} "
                      f"→ {s['loss_second_half']:.3f} nats (in-context drop {s['icl_loss_drop']:.3f})")
    if result.lens is not None:
        t = Table(title=f"logit lens (H(next token) = {s['next_token_entropy']:.3f} nats)", title_justify="left")
        for c in ("layer", "loss", "top1_agreement", "kl_to_final", "entropy", "mi_lower_bound"):
            t.add_column(c, justify="right")
        for r in result.lens.itertuples():
            t.add_row(str(r.layer), f"{r.loss:.3f}", f"{r.top1_agreement:.3f}", f"{r.kl_to_final:.3f}",
                      f"{r.entropy:.3f}", f"{r.mi_lower_bound:.3f}")
        console.print(t)
    t = Table(title="representations (layer 0: embeddings)", title_justify="left")
    for c in ("layer", "norm_mean", "norm_growth", "anisotropy", "effective_rank", "CKA with previous"):
        t.add_column(c, justify="right")
    for r in result.representations.itertuples():
        prev = f"{result.cka[r.layer, r.layer - 1]:.3f}" if r.layer > 0 and len(result.cka) else "—"
        t.add_row(str(r.layer), f"{r.norm_mean:.4g}", f"{r.norm_growth:.3f}", f"{r.anisotropy:.3f}",
                  f"{r.effective_rank:.1f}", prev)
    console.print(t)
    if result.cka_other is not None:
        other = result.cka_other["other"].iloc[0]
        console.print("CKA with the same layer of " + escape(str(other)) + ": " + ", ".join(
            f"{int(r.layer)}: {r.cka_with_other:.3f}" for r in result.cka_other.itertuples()))
    if len(result.neuron_layers):
        t = Table(title="MLP neurons (active: activation > threshold)", title_justify="left")
        for c in ("layer", "neurons", "dead", "always_on", "sparsity"):
            t.add_column(c, justify="right")
        for r in result.neuron_layers.itertuples():
            t.add_row(str(r.layer), str(r.neurons), str(r.dead), str(r.always_on), f"{r.sparsity:.3f}")
        console.print(t)
        for ex in result.neuron_examples[:6]:
            top = ex["examples"][0] if ex["examples"] else None
            if top:
                console.print(escape(f"  {ex['group']} L{ex['layer']}.n{ex['neuron']} (freq {ex['frequency']:.3f}): "
                                     f"…{top['context'][-30:]!r} [{top['token']!r}] {top['activation']:.3g}"))
    for n in result.notes:
        console.print(escape(n))
