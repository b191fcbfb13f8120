"""What gradient health costs the training thread.

nanoGPT training steps (``examples/train_gpt.py``'s model) with gradient accumulation (``--micro``
micro-batches per update) run plain and with ``layerscope.Monitor`` reading gradients: the per-tensor
gradient norms at every snapshot, the micro-batch increments for the noise scale after every
micro-batch (``observe_micro_batch``), and the update-ratio copy after each snapshot. Alternating
segments in one process. Reported: the time the training thread spends inside the monitor per
step — gradients alone (``stats.gradient_seconds``) and everything (``stats.blocked_seconds``,
snapshots included) — as a share of one plain step; target for the gradients: <= 2%.

    python bench/bench_monitor_gradients.py [--device cuda] [--segments 3] [--steps 100] [--every 25]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "src"))
from nanogpt_model import GPT, GPTConfig  # noqa: E402

import layerscope  # noqa: E402


def segment(model, opt, steps: int, args, monitor=None, start: int = 0) -> float:
    gen = torch.Generator().manual_seed(start)
    batches = [torch.randint(0, 256, (args.batch, args.block + 1), generator=gen) for _ in range(8)]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        step = start + i
        if monitor is not None:
            monitor.step(step)  # gradients of the previous update are still there
        opt.zero_grad(set_to_none=True)
        for k in range(args.micro):
            seq = batches[(i * args.micro + k) % len(batches)].to(args.device, non_blocking=True)
            _, loss = model(seq[:, :-1].contiguous(), seq[:, 1:].contiguous())
            (loss / args.micro).backward()
            if monitor is not None:
                monitor.observe_micro_batch(args.batch)
        opt.step()
    sync()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--segments", type=int, default=3)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 on a busy machine")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import train_gpt

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=train_gpt.n_layer, n_head=train_gpt.n_head, n_embd=train_gpt.n_embd,
                          block_size=args.block, bias=False, vocab_size=256, dropout=0.0)).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    segment(model, opt, 5, args)  # warm-up
    monitor = layerscope.Monitor(model, every=args.every, sinks=[], metrics=("frobenius_norm",), drift=False)
    plain, watched = [], []
    start = 0
    for _ in range(args.segments):
        plain.append(segment(model, opt, args.steps, args, None, start))
        start += args.steps
        watched.append(segment(model, opt, args.steps, args, monitor, start))
        start += args.steps
    stats = monitor.close()
    steps = args.segments * args.steps
    step_time = statistics.median(plain) / args.steps
    grad_share = stats.gradient_seconds / steps / step_time
    all_share = stats.blocked_seconds / steps / step_time
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters on {args.device}; {args.micro} micro-batches "
          f"of {args.batch}×{args.block} per update; snapshot every {args.every} steps; {steps} monitored steps")
    print(f"plain step: {step_time * 1e3:.2f} ms; monitored throughput / plain: "
          f"{statistics.median(plain) / statistics.median(watched):.3f}")
    print(f"gradient work on the training thread: {stats.gradient_seconds / steps * 1e6:.0f} µs per step = "
          f"{100 * grad_share:.2f}% of a step (target <= 2%: {'met' if grad_share <= 0.02 else 'NOT met'})")
    print(f"everything on the training thread (snapshots and update-ratio copies included): "
          f"{stats.blocked_seconds / steps * 1e6:.0f} µs per step = {100 * all_share:.2f}% of a step")
    print(f"snapshots analysed: {stats.analysed}, skipped busy: {stats.skipped_full}, errors: {stats.errors}")


if __name__ == "__main__":
    main()
