"""Top-5 Hessian eigenvalues: layerscope (Lanczos) vs PyHessian (power iteration with deflation).

Same model, same batch, same device, measured in one run:
  * HVP counts and wall time of each to its own stopping rule (layerscope: Ritz residual ≤ 1e-4·|θ_max|
    for the top 5; PyHessian: its default, relative change < 1e-3 between power iterations, maxIter 100);
  * each one's relative error against a converged float64 reference (Lanczos to residual 1e-10 on a
    float64 copy of the model);
  * one HVP against one gradient on the same batch (both recompute the forward pass).
Targets: layerscope ≥ 3× faster than PyHessian; one HVP ≤ 3× one gradient.

Models: the GPT trained by examples/train_gpt.py (trained here for a few hundred steps unless
--ckpt is given) and, with --big, an untrained ~10M-parameter GPT of the same family.

    python bench/bench_hessian.py [--ckpt out-train-gpt/ckpt_000600.pt] [--big] [--device cuda]
PyHessian: ``pip install --no-deps pyhessian`` (its only dependencies are torch and numpy).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "examples"))

from layerscope.probes import Objective, from_module, from_pairs, load_data, load_model  # noqa: E402
from layerscope.probes.hessian import HessianOperator  # noqa: E402
from layerscope.probes.lanczos import extreme_eigenpairs  # noqa: E402


class Logits(torch.nn.Module):
    """ids -> logits of an HF causal LM (PyHessian calls model(inputs) and criterion(outputs, targets))."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids).logits


def token_ce(logits, y):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def train_example(out: Path, iters: int) -> Path:
    import train_gpt

    train_gpt.configure([f"--out_dir={out}", f"--max_iters={iters}", f"--eval_interval={iters}", "--quiet=true", "--sinks=",
                         "--corpus_bytes=600000"])
    return Path(train_gpt.train()["checkpoints"][-1])


def big_gpt(directory: Path) -> Path:
    """An untrained ~10M-parameter nanoGPT (6 layers, d=384, 6 heads, byte vocabulary) saved as ckpt.pt."""
    from nanogpt_model import GPT, GPTConfig

    args = dict(n_layer=6, n_head=6, n_embd=384, block_size=128, bias=False, vocab_size=256, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_args": args, "iter_num": 0}, path)
    return path


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench(ckpt: Path, device: str, batch_size: int, seq_len: int, k: int = 5) -> dict:
    import pyhessian
    import pyhessian.hessian as ph

    model = load_model(ckpt, device=device)
    data = load_data(model, None, seq_len=seq_len, batches=1, batch_size=batch_size, seed=0)
    x, y = data.batch(0)
    x, y = x.to(device), y.to(device)
    print(f"\n== {ckpt}: {model.parameter_count:,} parameters, one batch of {batch_size}×{seq_len} tokens, {device}")

    # converged reference in float64
    ref_lm = copy.deepcopy(model.module).double()
    ref_model = from_module(Logits(ref_lm), token_ce)
    ref_obj = Objective(ref_model, from_pairs([(x, y)]))
    ref_op = HessianOperator(ref_obj)
    t = time.perf_counter()
    ref = extreme_eigenpairs(ref_op.matvec_tensor, ref_op.dim, k, bottom=False, tol=1e-10, max_iter=400, dtype=torch.float64,
                             device=device)
    print(f"reference (float64 Lanczos, residual ≤ 1e-10·θ_max): {ref_op.hvps} HVPs, {time.perf_counter() - t:.1f} s, "
          f"converged={ref.converged}; top-{k}: {np.array2string(ref.top, precision=6)}")
    del ref_lm, ref_model, ref_obj, ref_op

    # layerscope, float32, the same batch through the same model
    obj = Objective(model, data)
    op = HessianOperator(obj)
    sync(device)
    t = time.perf_counter()
    ours = extreme_eigenpairs(op.matvec_tensor, op.dim, k, bottom=False, tol=1e-4, max_iter=200, dtype=op.dtype, device=device)
    sync(device)
    ours_s = time.perf_counter() - t
    ours_err = np.abs(ours.top - ref.top) / np.abs(ref.top)

    # PyHessian, float32, its single-batch mode (gradient graph reused across products, as ours is)
    wrapped = Logits(model.module)
    counter = {"n": 0}
    original = ph.hessian_vector_product

    def counted(*a, **kw):
        counter["n"] += 1
        return original(*a, **kw)

    ph.hessian_vector_product = counted
    try:
        torch.manual_seed(0)
        sync(device)
        t = time.perf_counter()
        comp = pyhessian.hessian(wrapped, token_ce, data=(x, y), cuda=torch.device(device).type == "cuda")
        theirs, _ = comp.eigenvalues(top_n=k)
        sync(device)
        theirs_s = time.perf_counter() - t
    finally:
        ph.hessian_vector_product = original
    theirs = np.sort(np.asarray(theirs))[::-1]
    theirs_err = np.abs(theirs - ref.top) / np.abs(ref.top)

    # one HVP vs one gradient, both from scratch on the same batch
    fresh = HessianOperator(Objective(model, data))
    fresh_multi = HessianOperator(Objective(model, data))
    v = torch.randn(fresh.dim, device=device)
    times = {"grad": [], "hvp": []}
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        fresh.gradient()
        sync(device)
        times["grad"].append(time.perf_counter() - t)
        fresh_multi._graph = None  # force the forward + double backward every time
        sync(device)
        t = time.perf_counter()
        fresh_multi.matvec_tensor(v)
        fresh_multi._graph = None
        sync(device)
        times["hvp"].append(time.perf_counter() - t)
    grad_s, hvp_s = float(np.median(times["grad"])), float(np.median(times["hvp"]))

    speed = theirs_s / ours_s
    print(f"{'':12} {'HVPs':>6} {'time s':>8} {'max rel. error':>15}  top-{k}")
    print(f"{'layerscope':12} {op.hvps:>6} {ours_s:>8.2f} {ours_err.max():>15.2e}  {np.array2string(ours.top, precision=6)}")
    print(f"{'PyHessian':12} {counter['n']:>6} {theirs_s:>8.2f} {theirs_err.max():>15.2e}  {np.array2string(theirs, precision=6)}")
    print(f"speed-up layerscope vs PyHessian: {speed:.1f}× (target ≥ 3×: {'met' if speed >= 3 else 'NOT met'}); "
          f"HVPs {counter['n'] / max(op.hvps, 1):.1f}× fewer")
    ratio = hvp_s / grad_s
    print(f"one HVP {hvp_s * 1000:.1f} ms vs one gradient {grad_s * 1000:.1f} ms: {ratio:.2f}× "
          f"(target ≤ 3×: {'met' if ratio <= 3 else 'NOT met'})")
    return {"speedup": speed, "hvp_over_grad": ratio, "ours_err": float(ours_err.max()), "theirs_err": float(theirs_err.max())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="a nanoGPT ckpt.pt (default: train examples/train_gpt.py here)")
    p.add_argument("--iters", type=int, default=300, help="training steps when training the example (default 300)")
    p.add_argument("--big", action="store_true", help="also a ~10M-parameter GPT")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else train_example(Path(tmp) / "train", args.iters)
        bench(ckpt, args.device, args.batch_size, args.seq_len)
        if args.big:
            bench(big_gpt(Path(tmp) / "big"), args.device, args.batch_size, args.seq_len)


if __name__ == "__main__":
    main()
