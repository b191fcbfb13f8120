"""Train a small GPT on the CPU, with layerscope watching its weights while it trains.

The corpus is made from files every Python install has: the standard library's own sources,
read as bytes (a 256-token byte-level vocabulary, so no tokenizer is needed). The model is
nanoGPT's (``nanogpt_model.py`` beside this file). Checkpoints are saved in nanoGPT's format as
``ckpt_<iter>.pt``, so afterwards

    layerscope trajectory out-train-gpt --plot out-train-gpt/plots
    layerscope compare out-train-gpt/ckpt_000000.pt out-train-gpt/ckpt_000600.pt

show how the run went. Configuration is plain variables, overridable as ``--name=value``:

    python examples/train_gpt.py --max_iters=300 --n_layer=2
"""

from __future__ import annotations

import math
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nanogpt_model import GPT, GPTConfig  # noqa: E402

import layerscope  # noqa: E402

# -- configuration (nanoGPT style: plain variables, overridden by --name=value) -------------------
out_dir = "out-train-gpt"
corpus_bytes = 2_000_000  # how much of the standard library to read
max_iters = 600
eval_interval = 100  # also the checkpoint interval
eval_iters = 20
log_interval = 50
monitor_every = 50  # layerscope snapshot interval (steps)
monitor_when_full = "skip"  # when the previous snapshot is still being analysed: skip (and count) or block
batch_size = 16
block_size = 64
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 50
weight_decay = 0.1
seed = 1337
threads = 0  # torch threads (0: leave torch's default)
sinks = "console"  # comma-separated: console, jsonl (always written to out_dir), tensorboard, wandb
quiet = False


def build_corpus(max_bytes: int) -> np.ndarray:
    """The standard library's .py files, concatenated in a fixed order, as bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if total < 10 * block_size:
        raise SystemExit(f"train_gpt: found only {total} bytes of Python sources under {root}")
    return np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8)


def get_batch(data: np.ndarray, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=gen)
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix.tolist()])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix.tolist()])
    return x, y


def lr_at(it: int) -> float:
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    ratio = (it - warmup_iters) / max(1, max_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, ratio))) * (learning_rate - min_lr)


@torch.no_grad()
def estimate_loss(model: GPT, splits: dict[str, np.ndarray], gen: torch.Generator) -> dict[str, float]:
    model.eval()
    out = {}
    for split, data in splits.items():
        losses = [model(*get_batch(data, gen))[1].item() for _ in range(eval_iters)]
        out[split] = float(np.mean(losses))
    model.train()
    return out


def save_checkpoint(model: GPT, model_args: dict, it: int, val_loss: float) -> Path:
    path = Path(out_dir) / f"ckpt_{it:06d}.pt"
    torch.save({"model": model.state_dict(), "model_args": model_args, "iter_num": it,
                "best_val_loss": val_loss, "config": {"source": "examples/train_gpt.py"}}, path)
    return path


def train() -> dict:
    """Run the training; returns the losses at each evaluation and the checkpoint paths."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    data = build_corpus(corpus_bytes)
    split = int(0.9 * len(data))
    splits = {"train": data[:split], "val": data[split:]}
    model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=False,
                      vocab_size=256, dropout=dropout)
    model = GPT(GPTConfig(**model_args))
    optimizer = model.configure_optimizers(weight_decay, learning_rate, (0.9, 0.95), "cpu")
    gen = torch.Generator().manual_seed(seed)

    # -- layerscope: the whole integration is these lines -------------------------------------
    monitor = layerscope.Monitor(model, every=monitor_every,
                                 sinks=[s for s in sinks.split(",") if s and s != "jsonl"]
                                 + [f"jsonl:{out_dir}/monitor.jsonl"], when_full=monitor_when_full)

    history, checkpoints = [], []
    started = time.perf_counter()
    for it in range(max_iters + 1):
        if it % eval_interval == 0 or it == max_iters:
            losses = estimate_loss(model, splits, gen)
            history.append({"iter": it, **losses})
            checkpoints.append(str(save_checkpoint(model, model_args, it, losses["val"])))
            if not quiet:
                print(f"iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        monitor.step(it)  # layerscope: a snapshot every monitor_every steps, analysed in the background
        if it == max_iters:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it)
        x, y = get_batch(splits["train"], gen)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if not quiet and it % log_interval == 0:
            print(f"iter {it}: loss {loss.item():.4f} ({(time.perf_counter() - started) / (it + 1) * 1000:.0f} ms/step)")
    stats = monitor.close()  # layerscope: wait for the last analyses
    if not quiet:
        print(f"layerscope monitor: {stats.analysed} snapshots analysed, {stats.skipped_full} skipped (busy), "
              f"{stats.errors} errors; training blocked {stats.blocked_seconds:.2f} s in total")
    return {"history": history, "checkpoints": checkpoints, "monitor": stats,
            "seconds": time.perf_counter() - started}


def configure(argv: list[str]) -> None:
    """nanoGPT's configurator, reduced: ``--name=value`` for any variable above."""
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"train_gpt: expected --name=value, got {arg!r}")
        key, value = arg[2:].split("=", 1)
        if key not in globals() or key.startswith("_") or callable(globals()[key]):
            raise SystemExit(f"train_gpt: unknown setting {key!r}")
        current = globals()[key]
        if isinstance(current, bool):
            globals()[key] = value.lower() in ("1", "true", "yes")
        else:
            globals()[key] = type(current)(value)


if __name__ == "__main__":
    configure(sys.argv[1:])
    train()
