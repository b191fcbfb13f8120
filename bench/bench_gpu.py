"""CUDA path check and timing: ``--device cuda`` against the CPU, in one run, on the same weights.

Checks (fails loudly if any is wrong):
- every spectral metric from the GPU matches the CPU run (float64 both) to 1e-6 relative,
  including an ill-conditioned and a rank-deficient matrix (the float64 SVD fallback on GPU);
- a CUDA out-of-memory (forced by capping the allocator) falls back to the CPU with the same numbers.
Then times the 300M-parameter Llama-shaped checkpoint on CPU and GPU and prints the ratio.

    python bench/bench_gpu.py [--root /tmp/layerscope-bench] [--skip-big]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import layerscope  # noqa: E402
from make_checkpoint import ensure_checkpoint  # noqa: E402

SPECTRAL = ["spectral_norm", "stable_rank", "numerical_rank", "condition_number", "energy_rank_90", "energy_rank_99",
            "entropy_rank", "alpha", "log_norm"]


def _compare(a, b, label):
    a, b = a.set_index("name")[SPECTRAL], b.set_index("name")[SPECTRAL]
    worst = 0.0
    for col in SPECTRAL:
        x, y = a[col].astype(float).to_numpy(), b[col].astype(float).to_numpy()
        finite = np.isfinite(x) & np.isfinite(y)
        assert (np.isfinite(x) == np.isfinite(y)).all(), (label, col)
        rel = np.abs(x[finite] - y[finite]) / np.maximum(np.abs(y[finite]), 1e-300)
        worst = max(worst, float(rel.max()) if rel.size else 0.0)
    assert worst < 1e-6, f"{label}: GPU and CPU differ by {worst:.2e}"
    print(f"{label}: max relative difference GPU vs CPU {worst:.1e}  OK")


def _small_checkpoint(directory: Path) -> Path:
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((256, 256)))
    tensors = {
        "random.weight": torch.randn(1000, 300, generator=torch.Generator().manual_seed(0)),
        "illcond.weight": torch.from_numpy((u * np.logspace(0, -8, 256)).astype(np.float32)),
        "rank12.weight": torch.from_numpy(np.repeat(rng.standard_normal((200, 12)), 4, axis=1).astype(np.float32)),
    }
    path = directory / "small.safetensors"
    save_file(tensors, str(path))
    return path


def _embeddings_check() -> None:
    """All-pairs cosine geometry on the GPU equals the CPU's; then time a 50257 × 768 vocabulary."""
    from layerscope.weights.embeddings import GeometryOptions, cosine_geometry

    x = torch.randn(50257, 768, generator=torch.Generator().manual_seed(0))
    x[:, :16] += 2 * torch.randn(50257, 1, generator=torch.Generator().manual_seed(1))  # some structure
    exact = GeometryOptions(precision="float64", max_memory=64 << 20)
    cpu = cosine_geometry(x[:6000], exact)
    gpu = cosine_geometry(x[:6000], exact, device="cuda")
    assert cpu["histogram"] == gpu["histogram"], "GPU histogram differs"
    assert abs(cpu["mean"] - gpu["mean"]) < 1e-12 and cpu["threshold"]["pairs_above"] == gpu["threshold"]["pairs_above"]
    print("embeddings 6000 rows float64: GPU histogram, mean and neighbour counts equal the CPU's  OK")
    for device in ("cuda", "cpu"):
        start = time.perf_counter()
        r = cosine_geometry(x, GeometryOptions(), device=device)
        print(f"embeddings 50257×768 float32 on {device}: {time.perf_counter() - start:.1f}s (block {r['block_rows']} rows)")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="/tmp/layerscope-bench")
    parser.add_argument("--skip-big", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    tmp = Path(tempfile.mkdtemp())
    small = _small_checkpoint(tmp)
    cpu = layerscope.analyze(small, cache=False, store=str(tmp / "a.sqlite")).table
    gpu = layerscope.analyze(small, cache=False, store=str(tmp / "b.sqlite"), device="cuda").table
    _compare(gpu, cpu, "small matrices (incl. κ=1e8 and rank 12)")

    import logging

    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("layerscope").addHandler(handler)
    torch.cuda.empty_cache()  # otherwise cached blocks would still serve the allocations
    torch.cuda.set_per_process_memory_fraction(1e-6)  # every new allocation now fails: forced OOM
    oom = layerscope.analyze(small, cache=False, store=str(tmp / "c.sqlite"), device="cuda").table
    torch.cuda.set_per_process_memory_fraction(1.0)
    fallbacks = [w for w in warnings if "out of memory" in w]
    assert len(fallbacks) == 3, warnings
    print(f"forced OOM: {len(fallbacks)} fallback warnings, e.g. {fallbacks[0]!r}")
    _compare(oom, cpu, "forced CUDA OOM -> CPU fallback")

    _embeddings_check()
    if args.skip_big:
        return 0
    path = ensure_checkpoint(args.root, n_layers=4, dtype=torch.float32)
    timings = {}
    for device in ("cpu", "cuda"):
        start = time.perf_counter()
        result = layerscope.analyze(path, cache=False, store=str(tmp / f"{device}.sqlite"), device=device)
        timings[device] = time.perf_counter() - start
        timings[device + "_table"] = result.table
    _compare(timings["cuda_table"], timings["cpu_table"], "300M Llama-shaped checkpoint")
    print(f"300M checkpoint: cpu {timings['cpu']:.1f}s  cuda {timings['cuda']:.1f}s  speed-up {timings['cpu'] / timings['cuda']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
