"""What the training monitor costs a training loop.

The same nanoGPT training steps run with and without ``layerscope.Monitor`` (a snapshot every 50
steps, default metrics), alternating segments in one process so machine noise hits both alike.
Reported: the throughput ratio (monitored / plain; target >= 0.90 on a 2-core CPU) and the time
the training loop is blocked per snapshot (the copy), against one training step (target < 5%).

    python bench/bench_monitor.py [--device cuda] [--segments 3] [--steps 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from nanogpt_model import GPT, GPTConfig  # noqa: E402

import layerscope  # noqa: E402


def make(device: str, args) -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=args.n_layer, n_head=4, n_embd=args.n_embd, block_size=args.block, bias=False,
                          vocab_size=256, dropout=0.0)).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def segment(model, opt, steps: int, device: str, args, monitor=None, start: int = 0) -> float:
    """Seconds for ``steps`` training steps (the monitor's background work overlaps them)."""
    gen = torch.Generator().manual_seed(start)
    batches = [torch.randint(0, 256, (args.batch, args.block + 1), generator=gen) for _ in range(8)]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step = start + i
        seq = batches[i % len(batches)].to(device, non_blocking=True)
        _, loss = model(seq[:, :-1].contiguous(), seq[:, 1:].contiguous())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if monitor is not None:
            monitor.step(step)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--segments", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block", type=int, default=64)
    args = p.parse_args()
    device = args.device
    model, opt = make(device, args)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f}M parameters on {device}; {args.steps} steps per segment, snapshot every "
          f"{args.every}; torch threads {torch.get_num_threads()}")
    segment(model, opt, 20, device, args)  # warm-up
    plain, watched, blocked, snaps, analysis, skipped = [], [], [], 0, [], 0
    step = 1  # never 0 modulo every at the segment start: each monitored segment has steps/every snapshots
    for s in range(args.segments):
        plain.append(segment(model, opt, args.steps, device, args, start=step))
        monitor = layerscope.Monitor(model, every=args.every, sinks=[], run=f"bench-{s}")
        watched.append(segment(model, opt, args.steps, device, args, monitor, start=step))
        stats = monitor.close()  # drain outside the timed loop
        blocked.append(stats.blocked_seconds)
        snaps += stats.submitted
        skipped += stats.skipped_full + stats.skipped_memory
        analysis.append(stats.analysis_seconds / max(1, stats.analysed))
        print(f"segment {s}: plain {plain[-1]:.2f} s, monitored {watched[-1]:.2f} s "
              f"({stats.submitted} snapshots, {stats.skipped_full} skipped busy, blocked {stats.blocked_seconds * 1000:.1f} ms, "
              f"analysis {analysis[-1]:.2f} s each)")
    step_time = statistics.median(plain) / args.steps
    ratio = statistics.median(plain) / statistics.median(watched)
    per_snapshot = sum(blocked) / max(1, snaps)
    print(f"throughput monitored / plain: {ratio:.3f} (target >= 0.90: {'met' if ratio >= 0.90 else 'NOT met'})")
    print(f"training step: {step_time * 1000:.1f} ms; blocked per snapshot: {per_snapshot * 1000:.2f} ms "
          f"= {per_snapshot / step_time * 100:.1f}% of a step (target < 5%: "
          f"{'met' if per_snapshot / step_time < 0.05 else 'NOT met'})")
    print(f"snapshots taken {snaps}, skipped {skipped}; analysis per snapshot {statistics.median(analysis):.2f} s "
          f"in the background")


if __name__ == "__main__":
    main()
