"""What a 2-D loss landscape costs, against its floor and against loss-landscapes.

The model is ``examples/train_gpt.py``'s (4 layers, d_model 128, 4 heads, block 64, bytes), saved as
a nanoGPT checkpoint and loaded as layerscope probes load it. Measured in one run, on the same
batches (the probe data: ``--batches`` × ``--batch-size`` windows of 64 tokens):

* the floor: ``grid²`` × one plain forward of the model over those batches (``torch.no_grad``),
  timed over a few repeats before and after the grid and scaled (the better of the two);
* layerscope: ``layerscope.landscape`` on a ``grid × grid`` grid, filter-normalised directions, from
  an empty store (several points per forward through ``vmap``); target ≤ 1.2× the floor;
* loss-landscapes 3.0.6 (``pip install --no-deps loss-landscapes``: it needs only numpy):
  ``random_plane(model, metric, steps=grid, normalization="filter")`` on nanoGPT's own module with
  the same weights and batches, when it runs on this torch.

    python bench/bench_landscape.py [--grid 25] [--batches 2] [--batch-size 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "src"))
from nanogpt_model import GPT, GPTConfig  # noqa: E402

import layerscope  # noqa: E402
from layerscope.probes import Objective, load_data, load_model  # noqa: E402


def make_checkpoint(folder: Path) -> Path:
    import train_gpt

    torch.manual_seed(0)
    args = dict(n_layer=train_gpt.n_layer, n_head=train_gpt.n_head, n_embd=train_gpt.n_embd,
                block_size=train_gpt.block_size, bias=False, vocab_size=256, dropout=0.0)
    model = GPT(GPTConfig(**args))
    path = folder / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_args": args, "iter_num": 0}, path)
    return path


def floor_seconds(model, data, repeats: int) -> float:
    """Seconds of one plain forward over every probe batch (median of ``repeats``)."""
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for b in range(data.n_batches):
                model.module(input_ids=data.input_ids[b].to(model.device))
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def loss_landscapes_seconds(ckpt: Path, data, grid: int) -> tuple[float | None, str]:
    try:
        import loss_landscapes
        from loss_landscapes.metrics import Metric
    except ImportError as exc:
        return None, f"not installed ({exc})"
    saved = torch.load(ckpt, weights_only=True)
    net = GPT(GPTConfig(**saved["model_args"]))
    net.load_state_dict(saved["model"])
    net.eval()
    batches = [(data.input_ids[b], data.labels[b]) for b in range(data.n_batches)]

    class LMLoss(Metric):
        def __call__(self, model_wrapper) -> float:
            with torch.no_grad():
                return sum(float(model_wrapper.modules[0](x, y)[1]) for x, y in batches) / len(batches)

    try:
        t0 = time.perf_counter()
        loss_landscapes.random_plane(net, LMLoss(), distance=1, steps=grid, normalization="filter", deepcopy_model=True)
        return time.perf_counter() - t0, "ran"
    except Exception as exc:  # report, do not hide, why it does not run here
        return None, f"fails on torch {torch.__version__}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--grid", type=int, default=25)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--points-per-forward", type=int, default=None)
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 on a busy machine")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = make_checkpoint(tmp)
        model = load_model(ckpt, device=args.device)
        data = load_data(model, None, seq_len=64, batches=args.batches, batch_size=args.batch_size)
        Objective(model, data).evaluate()  # warm-up
        n = args.grid * args.grid
        before = floor_seconds(model, data, args.repeats)
        t0 = time.perf_counter()
        result = layerscope.landscape([model], data, grid=args.grid, span=1.0, store=tmp / "store.sqlite",
                                      points_per_forward=args.points_per_forward)
        ours = time.perf_counter() - t0
        after = floor_seconds(model, data, args.repeats)
        floor = min(before, after) * n
        print(f"model: train_gpt.py's GPT ({model.parameter_count:,} parameters), {args.device}, "
              f"{torch.get_num_threads()} torch threads; data {data.n_batches}×{args.batch_size}×64 tokens")
        print(f"floor: {n} × one plain forward over the batches = {floor:.2f} s "
              f"(one: {before * 1e3:.1f} ms before the grid, {after * 1e3:.1f} ms after)")
        print(f"layerscope {args.grid}×{args.grid} grid: {ours:.2f} s ({n / ours:.1f} points/s, "
              f"{result.summary['points_per_forward']} points per forward)")
        ratio = ours / floor
        print(f"ratio layerscope / floor: {ratio:.2f} (target <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'})")
        if not args.skip_baseline:
            secs, why = loss_landscapes_seconds(ckpt, data, args.grid)
            if secs is None:
                print(f"loss-landscapes random_plane: {why}")
            else:
                print(f"loss-landscapes random_plane {args.grid}×{args.grid}: {secs:.2f} s; "
                      f"ratio layerscope / loss-landscapes: {ours / secs:.2f} (lower is better; its ratio to the floor "
                      f"{secs / floor:.2f})")


if __name__ == "__main__":
    main()
