"""Diagonal Fisher through per-example gradients (``vmap(grad)``, layerscope) vs a per-example
backward loop (the slow reference), on the examples/train_gpt.py model.

Both compute F_ii = Σ_n w_n (∂ℓ_n/∂θ_i)² over the same batches (ℓ_n: example n's mean token loss,
w_n its share of the targets). In ONE process, interleaved ``--repeat`` times, best of each:

  (a) layerscope  ``fisher_diagonal(Objective(model, data))`` — vmapped chunks of examples, no store;
  (b) loop        for each example: forward, ``torch.autograd.grad``, accumulate w_n g_n² in float64.

Prints both times, the ratio loop / layerscope, the target (>= 5x) and whether it is met, and the
largest relative difference between the two results (they must agree).

The model: ``examples/train_gpt.py`` trained ``--iters`` steps at its default size (4 layers,
d_model 128, 4 heads, bytes: ~0.8M parameters), or ``--ckpt`` an existing ``ckpt.pt``.
Options: ``--batches``, ``--batch-size``, ``--seq-len``, ``--repeat``, ``--device``, ``--threads``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from layerscope.probes import Objective, load_data, load_model  # noqa: E402
from layerscope.probes.fisher import FisherOptions, fisher_diagonal  # noqa: E402

TARGET = 5.0


def train(iters: int, out: Path) -> str:
    import train_gpt

    train_gpt.configure([f"--max_iters={iters}", f"--eval_interval={iters}", "--eval_iters=2", f"--out_dir={out}",
                         "--quiet=True", "--corpus_bytes=300000", f"--monitor_every={iters}", "--warmup_iters=10"])
    result = train_gpt.train()
    return result["checkpoints"][-1]  # noqa: RET504


def loop_fisher(model, data) -> dict[str, torch.Tensor]:
    obj = Objective(model, data)
    names = list(model.params)
    params = [model.params[n] for n in names]
    acc = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in params]
    for b in range(data.n_batches):
        x, y = obj.examples(b)
        w = obj.example_weights(b)
        for i in range(x.shape[0]):
            logits = model.module(input_ids=x[i:i + 1]).logits[0]
            mask = y[i] != -100
            loss = torch.nn.functional.cross_entropy(logits[mask], y[i][mask])
            for a, g in zip(acc, torch.autograd.grad(loss, params)):
                a += float(w[i]) * g.double() ** 2
    return {n: a for n, a in zip(names, acc)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", help="a train_gpt.py ckpt.pt (default: train one)")
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    threads = args.threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or train(args.iters, Path(tmp) / "run")
        torch.set_num_threads(threads)  # train_gpt may have changed it
        model = load_model(ckpt, device=args.device)
        data = load_data(model, None, seq_len=args.seq_len, batches=args.batches, batch_size=args.batch_size)
        n = args.batches * args.batch_size
        print(f"model: {ckpt} ({model.parameter_count:,} parameters); {n} examples of {args.seq_len} tokens; "
              f"device {model.device}; torch threads {torch.get_num_threads()}")
        obj = Objective(model, data)
        fisher_diagonal(obj, FisherOptions(top_k=0))  # warm-up (functorch's first call)
        fast, slow = [], []
        for _ in range(args.repeat):
            t = time.perf_counter()
            got = fisher_diagonal(obj, FisherOptions(top_k=0))
            fast.append(time.perf_counter() - t)
            t = time.perf_counter()
            ref = loop_fisher(model, data)
            slow.append(time.perf_counter() - t)
        diff = max(float((got.values[k].double().to(ref[k].device) - ref[k]).abs().max() / ref[k].abs().max().clamp(min=1e-30))
                   for k in ref)
        a, b = min(fast), min(slow)
        ratio = b / a
        print(f"layerscope (vmap(grad), chunks of {got.rows} examples): {a:.2f} s   ({n / a:.1f} examples/s)")
        print(f"per-example backward loop:                     {b:.2f} s   ({n / b:.1f} examples/s)")
        print(f"max |difference| / max |F| per tensor: {diff:.2e}")
        print(f"ratio loop / layerscope: {ratio:.2f}x   target >= {TARGET:g}x: {'MET' if ratio >= TARGET else 'NOT MET'}")


if __name__ == "__main__":
    main()
