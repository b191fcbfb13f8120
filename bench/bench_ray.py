"""A trajectory of 8 checkpoints: plain single process vs Ray with 1 worker vs Ray with 2 workers.

The checkpoints are a real nanoGPT run (examples/train_gpt.py, 4 layers × 256 wide by default,
trained on the CPU, one checkpoint every 20 steps). One process, one local Ray instance with 2
CPUs (``ray.init(num_cpus=2)``: two worker processes); "1 worker" is the same instance with one
task in flight at a time (``max_in_flight=1``). The three configurations are interleaved for
``--rounds`` rounds, each on a fresh store (nothing cached), and the fastest of each is compared,
so load from other processes on a shared machine hits all three alike. The first Ray run, which
starts the worker processes and imports torch and layerscope in them, is timed apart ("cold").

Targets: 2 workers at least 1.6× faster than 1 worker (tasks scale with cores), and 2 workers
within 25% of the plain run. What limits them on this machine: 2 cores, shared with other
processes — the plain run already keeps both cores busy with threads (tensors within a
checkpoint), so Ray cannot beat it here, only match it; Ray adds per-task costs (pickling rows
and store records, the worker's private store, re-opening the checkpoint) and, cold, seconds of
worker start-up. On a cluster the plain run is limited to one machine's cores and Ray is not.

    python bench/bench_ray.py [--n-layer 4] [--n-embd 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def train(out: Path, args) -> list[str]:
    import train_gpt

    settings = dict(max_iters=20 * (args.checkpoints - 1), eval_interval=20, monitor_every=100000, n_layer=args.n_layer,
                    n_head=4, n_embd=args.n_embd, batch_size=8, block_size=64, corpus_bytes=400_000, eval_iters=2,
                    warmup_iters=10, out_dir=str(out), quiet=True, sinks="")
    train_gpt.configure([f"--{k}={v}" for k, v in settings.items()])
    return train_gpt.train()["checkpoints"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import pandas as pd
    import ray

    from layerscope.change.trajectory import trajectory
    from layerscope.executor import open_executor

    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        run_dir = Path(tmp) / "run"
        t = time.perf_counter()
        ckpts = train(run_dir, args)
        print(f"trained nanoGPT {args.n_layer}×{args.n_embd}: {len(ckpts)} checkpoints in {time.perf_counter() - t:.1f} s; "
              f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
        t = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        executor = open_executor("ray")
        print(f"ray.init: {time.perf_counter() - t:.1f} s")
        runs = 0

        busy: dict[str, list[float]] = {"ray1": [], "ray2": []}

        def timed(mode: str) -> tuple[float, pd.DataFrame]:
            nonlocal runs
            runs += 1
            store = os.path.join(tmp, f"store-{runs}.sqlite")
            executor.max_in_flight = {"ray1": 1, "ray2": 2}.get(mode)
            before = executor.busy_seconds
            t = time.perf_counter()
            result = trajectory([run_dir], store=store, cluster=None if mode == "plain" else "ray")
            seconds = time.perf_counter() - t
            if mode in busy:  # tasks running at once, on average: task seconds / wall seconds
                busy[mode].append((executor.busy_seconds - before) / seconds)
            return seconds, result.table

        cold, reference = timed("ray2")
        print(f"Ray cold (2 workers, starting the worker processes): {cold:.1f} s")
        times: dict[str, list[float]] = {"plain": [], "ray1": [], "ray2": []}
        for r in range(args.rounds):
            for mode in times:
                seconds, table = timed(mode)
                pd.testing.assert_frame_equal(table, reference, check_exact=True)  # same rows every time
                times[mode].append(seconds)
            print(f"round {r + 1}: " + ", ".join(f"{m} {v[-1]:.2f} s" for m, v in times.items())
                  + f" (load average {os.getloadavg()[0]:.1f})")
        ray.shutdown()
    best = {m: min(v) for m, v in times.items()}
    print(f"fastest of {args.rounds}: plain {best['plain']:.2f} s, Ray 1 worker {best['ray1']:.2f} s, "
          f"Ray 2 workers {best['ray2']:.2f} s ({len(reference)} rows, identical in every run)")
    scale = best["ray1"] / best["ray2"]
    vs_plain = best["ray2"] / best["plain"]
    print(f"ratio Ray 1 worker / 2 workers: {scale:.2f}x  (target >= 1.6x: {'met' if scale >= 1.6 else 'NOT met'})")
    print(f"ratio Ray 2 workers / plain:    {vs_plain:.2f}   (target <= 1.25: {'met' if vs_plain <= 1.25 else 'NOT met'})")
    print(f"ratio Ray cold / plain:         {cold / best['plain']:.2f}")
    print(f"tasks running at once (task seconds / wall): 1 worker {max(busy['ray1']):.2f}, 2 workers {max(busy['ray2']):.2f}")
    autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled")
    grouped = autogroup.exists() and autogroup.read_text().strip() == "1"
    print("limits: 2 cores, and the plain run's threads use both too; per-task pickling, private worker store and "
          "checkpoint re-open; worker start-up when cold"
          + ("; this kernel shares the CPU fairly between sessions (sched_autogroup): on a busy machine this session's "
             "share is fixed, so a second worker process runs at once but each task slows down" if grouped else ""))


if __name__ == "__main__":
    main()
