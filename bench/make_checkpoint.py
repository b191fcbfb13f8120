"""Build (and cache) a synthetic Llama-shaped HF checkpoint for the layerscope benchmarks.

The model is described by ``transformers.LlamaConfig`` and instantiated as ``LlamaForCausalLM``
on the *meta* device (no memory), which gives the exact tensor names and shapes HF uses. The
weights are then generated one tensor at a time (HF's own init: N(0, initializer_range) for
every Linear/Embedding, ones for the RMSNorm weights) and written shard by shard with
``safetensors``, so building the 16-layer variant never holds more than one shard in memory.
The result is a real HF folder: ``config.json`` + ``model.safetensors`` (or
``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json`` when larger than
``max_shard_bytes``), loadable with ``LlamaForCausalLM.from_pretrained``.

Usage as a module::

    from make_checkpoint import build_llama_checkpoint, ensure_checkpoint
    path = ensure_checkpoint("/tmp/layerscope-bench", n_layers=4, dtype=torch.float32)

CLI::

    python bench/make_checkpoint.py [ROOT] [--layers 4] [--dtype float32|bfloat16] [--small]

Full size (default): d_model 2048, d_ff 5504, 16 heads / 4 kv heads (head_dim 128), vocab
32000, untied lm_head: 308,299,776 parameters for 4 layers (1.23 GB in float32).
``--small``: d_model 512, d_ff 1376, 4 heads / 1 kv head (head_dim 128), vocab 32000, 2 layers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DEFAULT_ROOT = "/tmp/layerscope-bench"
DEFAULT_MAX_SHARD_BYTES = 2_000_000_000  # HF-style shards; 4 layers f32 (1.23 GB) stay one file
STAMP = ".layerscope-bench.json"
FORMAT_VERSION = 1

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LlamaSpec:
    n_layers: int = 4
    d_model: int = 2048
    d_ff: int = 5504
    n_heads: int = 16
    n_kv_heads: int = 4
    head_dim: int = 128
    vocab: int = 32000
    dtype: str = "float32"
    seed: int = 0

    @classmethod
    def small(cls, n_layers: int = 2, dtype: str = "float32", seed: int = 0) -> "LlamaSpec":
        return cls(n_layers=n_layers, d_model=512, d_ff=1376, n_heads=4, n_kv_heads=1, head_dim=128,
                   vocab=32000, dtype=dtype, seed=seed)

    @property
    def dirname(self) -> str:
        return (f"llama-L{self.n_layers}-d{self.d_model}-ff{self.d_ff}-h{self.n_heads}kv{self.n_kv_heads}"
                f"-v{self.vocab}-{self.dtype}-s{self.seed}")

    def hf_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.d_model, intermediate_size=self.d_ff,
            num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads, head_dim=self.head_dim, tie_word_embeddings=False,
            max_position_embeddings=2048, initializer_range=0.02, dtype=self.dtype,
        )


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
    else:
        name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return name


def _meta_state(spec: LlamaSpec) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of LlamaForCausalLM(spec), in HF order, without allocating."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(spec.hf_config())
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def _make_tensor(name: str, shape: tuple[int, ...], spec: LlamaSpec) -> torch.Tensor:
    """HF's init, deterministic per (seed, name) so the result does not depend on shard order."""
    dtype = _DTYPES[spec.dtype]
    if len(shape) == 1:  # RMSNorm weights
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + zlib.crc32(name.encode()))
    t = torch.empty(shape, dtype=torch.float32)
    t.normal_(0.0, 0.02, generator=gen)
    return t if dtype == torch.float32 else t.to(dtype)


def _stamp(spec: LlamaSpec, max_shard_bytes: int) -> dict:
    return {"format_version": FORMAT_VERSION, "spec": asdict(spec), "max_shard_bytes": max_shard_bytes}


def is_complete(directory: str | os.PathLike, spec: LlamaSpec, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> bool:
    path = Path(directory) / STAMP
    try:
        return json.loads(path.read_text()) == _stamp(spec, max_shard_bytes)
    except (OSError, ValueError):
        return False


def build_from_spec(directory: str | os.PathLike, spec: LlamaSpec, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    force: bool = False, verbose: bool = True) -> Path:
    """Write the checkpoint of ``spec`` into ``directory`` (skipped when already complete there)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if not force and is_complete(directory, spec, max_shard_bytes):
        if verbose:
            print(f"[make_checkpoint] cached: {directory}", file=sys.stderr)
        return directory
    started = time.perf_counter()
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    entries = _meta_state(spec)
    itemsize = torch.empty((), dtype=_DTYPES[spec.dtype]).element_size()
    # plan shards from the shapes alone (names of shards need the total count up front)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in entries:
        nbytes = itemsize * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    total_size = itemsize * sum(int(torch.Size(s).numel()) for _, s in entries)
    total_params = sum(int(torch.Size(s).numel()) for _, s in entries)

    config = spec.hf_config()
    config.save_pretrained(tmp)  # config.json
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards, 1):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _make_tensor(name, shape, spec) for name, shape in shard}
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
        weight_map.update({name: fname for name, _ in shard})
        if verbose:
            print(f"[make_checkpoint] wrote {fname} ({len(shard)} tensors)", file=sys.stderr)
    if len(shards) > 1:
        index = {"metadata": {"total_parameters": total_params, "total_size": total_size}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (tmp / STAMP).write_text(json.dumps(_stamp(spec, max_shard_bytes), indent=2) + "\n")

    shutil.rmtree(directory, ignore_errors=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, directory)
    if verbose:
        print(f"[make_checkpoint] built {directory}: {total_params:,} parameters, {total_size / 1e9:.2f} GB, "
              f"{len(shards)} shard(s), {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return directory


def build_llama_checkpoint(directory: str | os.PathLike, n_layers: int = 4, dtype: torch.dtype | str = torch.bfloat16,
                           seed: int = 0, *, small: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                           force: bool = False, verbose: bool = True) -> Path:
    """Build the synthetic Llama checkpoint in ``directory`` itself (skipped when already complete).

    Full size: d_model 2048, d_ff 5504, 16 heads / 4 kv heads (head_dim 128), vocab 32000, untied
    lm_head (≈308M parameters at 4 layers). ``small=True``: d_model 512 variant for smoke runs.
    """
    name = _dtype_name(dtype)
    spec = LlamaSpec.small(n_layers, name, seed) if small else LlamaSpec(n_layers=n_layers, dtype=name, seed=seed)
    return build_from_spec(directory, spec, max_shard_bytes=max_shard_bytes, force=force, verbose=verbose)


def ensure_checkpoint(root: str | os.PathLike = DEFAULT_ROOT, n_layers: int = 4, dtype: torch.dtype | str = torch.float32,
                      seed: int = 0, *, small: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      verbose: bool = True) -> Path:
    """The cached checkpoint under ``root`` (a sub-folder named after the spec), built if missing."""
    name = _dtype_name(dtype)
    spec = LlamaSpec.small(n_layers, name, seed) if small else LlamaSpec(n_layers=n_layers, dtype=name, seed=seed)
    return build_from_spec(Path(root) / spec.dirname, spec, max_shard_bytes=max_shard_bytes, verbose=verbose)


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    return sorted(Path(directory).glob("*.safetensors"))


def warm_page_cache(directory: str | os.PathLike) -> int:
    """Read every file of the checkpoint once so that all timed runs see a warm page cache."""
    total = 0
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    for path in sorted(Path(directory).iterdir()):
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while True:
                    n = f.readinto(view)
                    if not n:
                        break
                    total += n
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", nargs="?", default=DEFAULT_ROOT, help=f"cache folder (default {DEFAULT_ROOT})")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 4, or 2 with --small)")
    ap.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", action="store_true", help="d_model 512 smoke-test variant (2 layers by default)")
    ap.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES)
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = ap.parse_args(argv)
    n_layers = args.layers or (2 if args.small else 4)
    spec = (LlamaSpec.small(n_layers, args.dtype, args.seed) if args.small
            else LlamaSpec(n_layers=n_layers, dtype=args.dtype, seed=args.seed))
    path = build_from_spec(Path(args.root) / spec.dirname, spec, max_shard_bytes=args.max_shard_bytes, force=args.force)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
