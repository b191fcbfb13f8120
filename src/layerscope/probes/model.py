"""A model that can run, built from what the user has, with its parameters named as the anatomy knows them.

Three ways in, one object out (:class:`RunnableModel`):

* a Hugging Face checkpoint (folder or hub id): ``transformers``' Auto class is chosen from
  ``config.json`` (``architectures``): causal LM, masked LM, or the bare model (no LM head, e.g. a
  sentence encoder). ``trust_remote_code`` is never passed, so a checkpoint that needs its own code
  is refused with one line instead of executed.
* a nanoGPT ``ckpt.pt``: nanoGPT's parameter names are GPT-2's, so the state dict is mapped onto
  ``GPT2LMHeadModel`` (Linear ``[out, in]`` -> Conv1D ``[in, out]``, exact GELU, LayerNorm eps 1e-5).
  A ``bias=False`` nanoGPT has no biases: GPT-2's are set to zero and kept *out of* the probe's
  parameters, because they do not exist in the model being probed.
* a live ``nn.Module`` from Python, with the user's loss function (PyHessian's and curvlinops' call
  shape); any model works, transformer or not.

Attention runs in the ``eager`` implementation: fused attention kernels do not all support the double
backward that exact Hessian-vector products need.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..anatomy import Anatomy, build_anatomy
from ..errors import LayerscopeError
from ..sources import Source, TensorInfo, open_source
from ..sources.base import dtype_name

KINDS = ("causal", "masked", "base", "custom")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class HeadSlice:
    """The entries of one parameter that belong to one attention head.

    ``kind`` is q, k, v or o; ``head`` the query head (q, o) or key/value head (k, v: GQA-aware, there
    are ``n_kv_heads`` of them); ``select`` maps a tensor shaped like the parameter (the parameter, its
    gradient, a squared gradient...) to that head's entries.
    """

    param: str
    kind: str
    head: int
    select: Callable[[torch.Tensor], torch.Tensor] = field(compare=False)


@dataclass
class RunnableModel:
    """A model ready to run on batches, and what each of its parameters is.

    module: the ``nn.Module`` in eval mode on ``device``.
    kind: ``causal`` (next-token LM), ``masked`` (masked LM), ``base`` (no LM head: loss-based probes
        refuse it with ``no_lm_head_reason``) or ``custom`` (live module with the user's loss).
    params: the parameters probes differentiate, by the module's own names (tied weights once).
    constants: parameters held fixed (zero biases a nanoGPT without biases does not have).
    anatomy: built from the module's parameter names and shapes, so role, layer, fused-matrix slices
        and head splits are the ones the weight analyses use.
    checkpoint_names: module parameter name -> the tensor's name in the checkpoint.
    weights_hash: digest of every checkpoint tensor's content hash (a store-key part).
    """

    module: torch.nn.Module
    kind: str
    params: dict[str, torch.nn.Parameter]
    anatomy: Anatomy
    checkpoint_names: dict[str, str]
    weights_hash: str
    label: str
    device: torch.device
    dtype: torch.dtype
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    vocab_size: int | None = None
    max_positions: int | None = None
    tokenizer_dir: Path | None = None
    source: Source | None = None
    loss_fn: Callable[..., torch.Tensor] | None = None  # custom kind only
    no_lm_head_reason: str | None = None

    # -- what a parameter is --------------------------------------------------------------------
    def role(self, name: str) -> str:
        return self.anatomy.entries[name].role

    def layer(self, name: str) -> int | None:
        return self.anatomy.entries[name].layer

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def param_table(self):
        """One row per probe parameter: name, checkpoint name, role, layer, shape, numel."""
        import pandas as pd

        rows = [{"name": n, "checkpoint_name": self.checkpoint_names.get(n, n), "role": self.role(n), "layer": self.layer(n),
                 "shape": tuple(p.shape), "numel": p.numel()} for n, p in self.params.items()]
        frame = pd.DataFrame(rows)
        frame["layer"] = frame["layer"].astype("Int64")
        return frame

    def head_slices(self, name: str) -> list[HeadSlice]:
        """The per-head pieces of parameter ``name`` (q/k/v/o weights and q/k/v biases; [] otherwise).

        Every entry of an attention projection belongs to exactly one head, so summing a quantity over
        a parameter's head slices gives the parameter's total (tested)."""
        return head_slices(self.anatomy, name, tuple(self.params[name].shape))

    def require_lm_head(self, what: str = "this probe") -> None:
        """Raise the one-line error loss-based probes give for a model without an LM head."""
        if self.kind == "base":
            raise LayerscopeError(f"{self.label}: {what} needs a loss, and {self.no_lm_head_reason}")

    def state(self) -> dict[str, torch.Tensor]:
        """params and constants together: what ``torch.func.functional_call`` needs."""
        return {**self.params, **self.constants}


# -- per-head slices --------------------------------------------------------------------------
def head_slices(anatomy: Anatomy, name: str, shape: tuple[int, ...]) -> list[HeadSlice]:
    e = anatomy.entries.get(name)
    d = anatomy.dims
    if e is None or not d.head_dim:
        return []
    hd = d.head_dim
    weight = name.endswith(".weight")
    out: list[HeadSlice] = []

    def rows(kind: str, n_heads: int, pick: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for h in range(n_heads):
            out.append(HeadSlice(name, kind, h, lambda t, h=h: pick(t)[h * hd:(h + 1) * hd]))

    n_q, n_kv = d.n_heads or 0, d.n_kv_heads or d.n_heads or 0
    if e.role in ("attn.q", "attn.k", "attn.v") and len(shape) in (1, 2):
        n = n_q if e.role == "attn.q" else n_kv
        if n * hd == shape[0]:
            rows(e.role[-1], n, lambda t: t)
    elif e.role == "attn.o" and weight and len(shape) == 2:
        # the o projection reads the concatenated heads: its input dimension is split by head
        if e.transposed:
            rows("o", n_q, lambda t: t)
        else:
            rows("o", n_q, lambda t: t.T)
    elif e.role == "attn.qkv" and weight and len(shape) == 2:
        for part in anatomy.parts(name):
            if part.suffix in ("q", "k", "v"):
                rows(part.suffix, n_q if part.suffix == "q" else n_kv, part.apply)
    elif name.endswith(".bias") and len(shape) == 1 and e.role in ("bias", "other") and _fused_qkv_weight(anatomy, name):
        w = anatomy.entries[_fused_qkv_weight(anatomy, name)]
        # the bias of a fused qkv matrix: cut it like the weight's rows (a column vector)
        fake = anatomy.parts(w.name)
        for part in fake:
            if part.suffix in ("q", "k", "v"):
                sel = part.select

                def pick(t: torch.Tensor, sel=sel) -> torch.Tensor:
                    col = t.unsqueeze(0) if w.transposed else t.unsqueeze(1)
                    return sel(col).reshape(-1)

                rows(part.suffix, n_q if part.suffix == "q" else n_kv, pick)
    elif name.endswith(".bias") and len(shape) == 1:
        base = name[: -len(".bias")] + ".weight"
        be = anatomy.entries.get(base)
        if be is not None and be.role in ("attn.q", "attn.k", "attn.v"):
            n = n_q if be.role == "attn.q" else n_kv
            if n * hd == shape[0]:
                rows(be.role[-1], n, lambda t: t)
    return out


def _fused_qkv_weight(anatomy: Anatomy, bias_name: str) -> str | None:
    base = bias_name[: -len(".bias")] + ".weight"
    e = anatomy.entries.get(base)
    return base if e is not None and e.role == "attn.qkv" else None


# -- weights hash -----------------------------------------------------------------------------
def check_same_parameters(models: "list[RunnableModel] | tuple[RunnableModel, ...]", what: str) -> None:
    """One line when ``models`` do not have the same parameter names and shapes; ``what`` says what
    needed them to (``"cannot merge"``, ``"cannot put on one landscape"``)."""
    first = models[0]
    for m in models[1:]:
        if set(m.params) != set(first.params):
            extra = sorted(set(m.params) ^ set(first.params))[:3]
            raise LayerscopeError(f"{what} {first.label} and {m.label}: not the same parameters ({', '.join(extra)} ...)")
        for n, p in first.params.items():
            if tuple(m.params[n].shape) != tuple(p.shape):
                raise LayerscopeError(f"{what} {first.label} and {m.label}: {n} has shape {tuple(p.shape)} "
                                      f"vs {tuple(m.params[n].shape)}")


def weights_hash(source: Source, store: Any = None) -> str:
    """sha256 over (name, content hash) of every tensor of the checkpoint, in name order.

    Per-tensor hashes come from the same ``read_with_hash`` the weight analyses use, so with a store a
    re-run finds them by file fingerprint without reading the weights again."""
    from ..pipeline import read_with_hash

    h = hashlib.sha256()
    for name in sorted(source.infos):
        if store is not None:
            _, digest = read_with_hash(source, store, name)
        else:
            _, digest = source.read(name)
        h.update(f"{name}={digest};".encode())
    return h.hexdigest()[:32]


# -- building ---------------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None) -> torch.device:
    """``cuda``/``auto`` fall back to the CPU (with the reason logged) when CUDA is not available."""
    import logging

    text = str(device or "cpu")
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger("layerscope").warning("CUDA is not available: running on the CPU")
        text = "cpu"
    try:
        return torch.device(text)
    except RuntimeError:
        raise LayerscopeError(f"--device: expected cpu, cuda, cuda:N or auto, got {text!r}") from None


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LayerscopeError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_model(spec: Any, *, device: str | torch.device | None = "cpu", dtype: str | torch.dtype | None = None,
               revision: str | None = None, store: Any = None, loss_fn: Callable[..., torch.Tensor] | None = None) -> RunnableModel:
    """A :class:`RunnableModel` from a checkpoint path, hub id, ``nn.Module`` or RunnableModel."""
    if isinstance(spec, RunnableModel):
        return spec
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if isinstance(spec, torch.nn.Module):
        return from_module(spec, loss_fn=loss_fn, device=dev, dtype=dt if dtype is not None else None)
    source = open_source(spec, revision)
    if source.format == "nanogpt":
        model = _nanogpt(source, dev, dt)
    else:
        model = _huggingface(source, dev, dt)
    model.weights_hash = weights_hash(source, store)
    return model


def from_module(module: torch.nn.Module, loss_fn: Callable[..., torch.Tensor] | None = None, *,
                device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                label: str | None = None) -> RunnableModel:
    """Wrap a live module. With ``loss_fn`` the objective is ``loss_fn(module(X), y)`` over (X, y)
    batches; without it the module must be a transformers LM (it is then probed like a checkpoint)."""
    from ..sources.module import ModuleSource, unwrap

    module = unwrap(module)
    if device is not None or dtype is not None:
        module = module.to(device=device, dtype=dtype)
    module.eval()
    first = next(module.parameters(), None)
    if first is None:
        raise LayerscopeError(f"{label or type(module).__name__}: the module has no parameters")
    config = getattr(module, "config", None)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else None
    if loss_fn is not None:
        kind = "custom"
    elif config_dict is not None:
        kind = _kind_from_module(module)
    else:
        raise LayerscopeError(f"{label or type(module).__name__}: pass loss_fn=... (a module that is not a transformers "
                              "language model needs its loss function)")
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    anatomy = _module_anatomy(module, params, config_dict)
    source = ModuleSource(module, label=label)
    model = RunnableModel(module=module, kind=kind, params=params, anatomy=anatomy,
                          checkpoint_names={n: n for n in params}, weights_hash=weights_hash(source), label=source.label,
                          device=first.device, dtype=first.dtype, loss_fn=loss_fn, source=source,
                          vocab_size=_vocab(config_dict), max_positions=_max_positions(config_dict))
    if kind == "base":
        model.no_lm_head_reason = f"{type(module).__name__} has no language-model head (it is not a transformers LM)"
    return model


def _module_anatomy(module: torch.nn.Module, params: dict[str, torch.Tensor], config: dict | None) -> Anatomy:
    infos = {n: TensorInfo(n, tuple(p.shape), dtype_name(p.dtype)) for n, p in params.items()}
    return build_anatomy(infos, config)


def _vocab(config: dict | None) -> int | None:
    if not config:
        return None
    for key in ("vocab_size", "n_vocab"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def _max_positions(config: dict | None) -> int | None:
    if not config:
        return None
    for key in ("n_positions", "max_position_embeddings", "block_size", "n_ctx"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return None


def _kind_from_module(module: torch.nn.Module) -> str:
    name = type(module).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal"
    if name.endswith("ForMaskedLM"):
        return "masked"
    return "base"


def _kind_from_config(config: dict) -> str:
    archs = config.get("architectures") or []
    for a in archs:
        if isinstance(a, str) and a.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal"
    for a in archs:
        if isinstance(a, str) and a.endswith("ForMaskedLM"):
            return "masked"
    if archs:
        return "base"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return "causal" if config.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else "base"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise LayerscopeError("running a model needs transformers: pip install 'layerscope[probe]'") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # our own progress display is the only one
    return transformers


def _huggingface(source: Source, device: torch.device, dtype: torch.dtype) -> RunnableModel:
    tf = _transformers()
    config = source.config
    if source.directory is None or not config:
        raise LayerscopeError(f"{source.label}: cannot run this model: no config.json beside the weights "
                              "(layerscope runs Hugging Face checkpoints with their config, or nanoGPT ckpt.pt files)")
    if config.get("auto_map") and config.get("model_type") not in tf.models.auto.configuration_auto.CONFIG_MAPPING_NAMES:
        raise LayerscopeError(f"{source.label}: this architecture ({config.get('model_type')}) needs the checkpoint's own "
                              "code, and layerscope never runs remote code (trust_remote_code=False)")
    kind = _kind_from_config(config)
    auto = {"causal": tf.AutoModelForCausalLM, "masked": tf.AutoModelForMaskedLM, "base": tf.AutoModel}[kind]
    try:
        module = auto.from_pretrained(source.directory, dtype=dtype, trust_remote_code=False, attn_implementation="eager")
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LayerscopeError(f"{source.label}: transformers cannot load it: {first}") from None
    module.to(device).eval()
    params = {n: p for n, p in module.named_parameters()}
    anatomy = _module_anatomy(module, params, module.config.to_dict())
    names = set(source.infos)
    checkpoint_names = {n: _checkpoint_name(n, names, module) for n in params}
    model = RunnableModel(module=module, kind=kind, params=params, anatomy=anatomy, checkpoint_names=checkpoint_names,
                          weights_hash="", label=source.label, device=device, dtype=dtype,
                          vocab_size=_vocab(module.config.to_dict()), max_positions=_max_positions(module.config.to_dict()),
                          tokenizer_dir=source.directory, source=source)
    if kind == "base":
        model.no_lm_head_reason = (f"it is a {type(module).__name__} without a language-model head "
                                   f"(config.json architectures: {', '.join(config.get('architectures') or ['none'])})")
    return model


def _checkpoint_name(name: str, names: set[str], module: torch.nn.Module) -> str:
    """The checkpoint's name for a module parameter: the same, or with/without the base-model prefix."""
    if name in names:
        return name
    prefix = getattr(module, "base_model_prefix", "") or ""
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in names:
        return name[len(prefix) + 1:]
    if prefix and f"{prefix}.{name}" in names:
        return f"{prefix}.{name}"
    return name


# -- nanoGPT -> GPT-2 ---------------------------------------------------------------------------
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def nanogpt_config(model_args: dict) -> Any:
    """The GPT2Config that computes what nanoGPT's ``model.py`` computes."""
    tf = _transformers()
    try:
        n_embd, n_layer, n_head = int(model_args["n_embd"]), int(model_args["n_layer"]), int(model_args["n_head"])
        block_size, vocab = int(model_args["block_size"]), int(model_args["vocab_size"])
    except (KeyError, TypeError, ValueError):
        raise LayerscopeError("nanoGPT checkpoint: model_args lacks n_embd/n_layer/n_head/block_size/vocab_size") from None
    return tf.GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=block_size, vocab_size=vocab,
                         n_inner=4 * n_embd, activation_function="gelu",  # nanoGPT: nn.GELU(), the exact erf form
                         layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def map_nanogpt_state(state: dict[str, torch.Tensor], module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], set[str]]:
    """nanoGPT's state dict in GPT2LMHeadModel's layout, and the GPT-2 parameters nanoGPT lacks (zeros)."""
    target = module.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
            continue  # causal-mask buffers, not weights
        if name not in target:
            raise LayerscopeError(f"nanoGPT checkpoint: tensor {name!r} has no place in GPT-2")
        value = t.T if name.endswith(CONV1D_SUFFIXES) else t
        if tuple(value.shape) != tuple(target[name].shape):
            raise LayerscopeError(f"nanoGPT checkpoint: {name} has shape {tuple(t.shape)}, GPT-2 expects {tuple(target[name].shape)}")
        mapped[name] = value
    absent = {n for n, _ in module.named_parameters() if n not in mapped and not (n == "lm_head.weight")}
    for n in absent:
        if not n.endswith(".bias"):
            raise LayerscopeError(f"nanoGPT checkpoint: missing weight {n}")
        mapped[n] = torch.zeros_like(target[n])
    return mapped, absent


def _nanogpt(source: Source, device: torch.device, dtype: torch.dtype) -> RunnableModel:
    tf = _transformers()
    args = {k: v for k, v in (source.config or {}).items() if k != "model_type"}
    config = nanogpt_config(args)
    config._attn_implementation = "eager"
    module = tf.GPT2LMHeadModel(config)
    state = {name: source.load(name) for name in source.infos}
    mapped, absent = map_nanogpt_state(state, module)
    missing = module.load_state_dict(mapped, strict=False)
    if [k for k in missing.missing_keys if k != "lm_head.weight"]:
        raise LayerscopeError(f"nanoGPT checkpoint: missing {missing.missing_keys[:3]}")
    module.tie_weights()
    module.to(device=device, dtype=dtype).eval()
    for n, p in module.named_parameters():
        if n in absent:  # not in the model being probed: frozen, so no probe (nor PyHessian) differentiates them
            p.requires_grad_(False)
    params = {n: p for n, p in module.named_parameters() if n not in absent}
    constants = {n: p for n, p in module.named_parameters() if n in absent}
    anatomy = _module_anatomy(module, params, config.to_dict())
    return RunnableModel(module=module, kind="causal", params=params, anatomy=anatomy,
                         checkpoint_names={n: n for n in params}, weights_hash="", label=source.label, device=device,
                         dtype=dtype, constants=constants, vocab_size=config.vocab_size, max_positions=config.n_positions,
                         tokenizer_dir=source.directory, source=source)
