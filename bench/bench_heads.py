"""layerscope.heads versus the direct notebook method on a Qwen2.5-3B-shaped attention stack.

Checkpoint: a real HF folder built with ``transformers.Qwen2Config`` + ``Qwen2ForCausalLM``
(random HF init, seeded, float32, ``save_pretrained``) with Qwen2.5-3B's attention shape:
d_model 2048, 16 query heads, 2 kv heads (GQA group 8), head_dim 128, 4 layers (64 heads).
Only attention matters here, so vocab is 1024 and the MLP intermediate size 256.
``--small``: d_model 512, 4 query heads, 2 kv heads, head_dim 128, 2 layers (8 heads).

Timed:

  layerscope  ``layerscope.heads(path, store=<fresh temp sqlite>, cache=False)``: reads the
              weights, and for every (layer, head) computes QK = W_Q,hᵀ W_K,g and OV = W_O,h W_V,g
              metrics through head_dim × head_dim factored products. End to end, weights read
              included. One untimed warm-up call first (imports, torch/LAPACK init), then
              ``--repeats`` timed calls, each on a fresh store; the median is used.
  direct      what a notebook would do, per head: form A (d_model × d_model) explicitly in
              float64 with NumPy (A = W_Q,hᵀ W_K,g, and A = W_O,h W_V,g), then
              ``numpy.linalg.eigvals(A)`` and ``numpy.linalg.svd(A, compute_uv=False)``, for both
              circuits. NumPy (OpenBLAS/LAPACK) float64, not torch. Weights are already in memory
              as float64 (reading them is NOT charged to the direct method). Far too slow for all
              heads on 2 cores, so it runs on ``--direct-heads`` heads (both circuits each) after
              one warm-up of the same calls on a small matrix, and the per-head time is
              extrapolated linearly to all heads (every head costs the same: same shapes).

Cross-check on the heads run directly: max relative difference of spectral norm (σ₁), Frobenius
norm and top |eigenvalue| against layerscope's ``{qk,ov}_spectral_norm``,
``{qk,ov}_frobenius_norm`` and ``{qk,ov}_top_eig_abs`` columns.

``python bench/bench_heads.py [--small] [--root DIR] [--repeats 3] [--direct-heads 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = "/tmp/layerscope-bench"
STAMP = ".layerscope-bench-qwen2.json"


def spec(small: bool) -> dict:
    if small:
        return dict(n_layers=2, d_model=512, n_heads=4, n_kv_heads=2, head_dim=128, d_ff=256, vocab=1024, seed=0)
    return dict(n_layers=4, d_model=2048, n_heads=16, n_kv_heads=2, head_dim=128, d_ff=256, vocab=1024, seed=0)


def ensure_qwen2_checkpoint(root: str, s: dict) -> Path:
    """A Qwen2ForCausalLM (random init) saved with save_pretrained; cached under ``root``."""
    name = (f"qwen2-L{s['n_layers']}-d{s['d_model']}-h{s['n_heads']}kv{s['n_kv_heads']}-hd{s['head_dim']}"
            f"-ff{s['d_ff']}-v{s['vocab']}-s{s['seed']}")
    directory = Path(root) / name
    stamp = directory / STAMP
    if stamp.exists() and json.loads(stamp.read_text()) == s:
        print(f"[bench_heads] cached checkpoint: {directory}", file=sys.stderr)
        return directory
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    started = time.perf_counter()
    torch.manual_seed(s["seed"])
    cfg = Qwen2Config(vocab_size=s["vocab"], hidden_size=s["d_model"], intermediate_size=s["d_ff"],
                      num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"],
                      num_key_value_heads=s["n_kv_heads"], head_dim=s["head_dim"], max_position_embeddings=2048,
                      tie_word_embeddings=False, initializer_range=0.02)
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    del model
    (tmp / STAMP).write_text(json.dumps(s))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    print(f"[bench_heads] built {directory} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return directory


def load_attention(path: Path, s: dict) -> dict[int, dict[str, np.ndarray]]:
    """q/k/v/o weights of every layer as float64 NumPy arrays, (out_features, in_features)."""
    from safetensors.numpy import load_file

    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    out = {}
    for layer in range(s["n_layers"]):
        p = f"model.layers.{layer}.self_attn."
        out[layer] = {k: tensors[p + f"{k}_proj.weight"].astype(np.float64) for k in "qkvo"}
    return out


def direct_head(w: dict[str, np.ndarray], h: int, s: dict) -> dict[str, float]:
    """The notebook method for one head, both circuits: explicit d_model × d_model A, eigvals + svd."""
    hd, group = s["head_dim"], s["n_heads"] // s["n_kv_heads"]
    g = h // group
    wq_h = w["q"][h * hd:(h + 1) * hd]  # (head_dim, d_model)
    wk_g = w["k"][g * hd:(g + 1) * hd]
    wv_g = w["v"][g * hd:(g + 1) * hd]
    wo_h = w["o"][:, h * hd:(h + 1) * hd]  # (d_model, head_dim)
    out = {}
    for name, (a, b) in {"qk": (wq_h.T, wk_g), "ov": (wo_h, wv_g)}.items():
        A = a @ b  # d_model × d_model, float64
        eig = np.linalg.eigvals(A)
        sv = np.linalg.svd(A, compute_uv=False)
        out[f"{name}_spectral_norm"] = float(sv[0])
        out[f"{name}_frobenius_norm"] = float(np.sqrt(np.sum(sv * sv)))
        out[f"{name}_top_eig_abs"] = float(np.abs(eig).max())
    return out


def run_layerscope(path: Path) -> tuple[float, object]:
    import layerscope

    with tempfile.TemporaryDirectory(prefix="bench-heads-") as tmp:
        t0 = time.perf_counter()
        res = layerscope.heads(str(path), store=str(Path(tmp) / "store.sqlite"), cache=False)
        seconds = time.perf_counter() - t0
    return seconds, res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="d_model 512, 4 heads / 2 kv, 2 layers (smoke run)")
    ap.add_argument("--root", default=DEFAULT_ROOT, help=f"checkpoint cache folder (default {DEFAULT_ROOT})")
    ap.add_argument("--repeats", type=int, default=3, help="timed layerscope calls (median used; default 3)")
    ap.add_argument("--direct-heads", type=int, default=2, help="heads timed with the direct method (default 2)")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(HERE))
    from make_checkpoint import warm_page_cache

    import torch

    s = spec(args.small)
    path = ensure_qwen2_checkpoint(args.root, s)
    warm_page_cache(path)
    n_total = s["n_layers"] * s["n_heads"]

    # -- layerscope: one warm-up, then timed calls on fresh stores --------------------------------
    run_layerscope(path)
    ls_times, res = [], None
    for _ in range(args.repeats):
        seconds, res = run_layerscope(path)
        ls_times.append(seconds)
    ls_med = statistics.median(ls_times)
    table = res.table
    assert len(table) == n_total, f"layerscope returned {len(table)} rows, expected {n_total}"

    # -- direct: warm-up on a small matrix, then a few heads spread over layers / kv groups -------
    rng = np.random.default_rng(0)
    warm = rng.standard_normal((256, 256))
    np.linalg.eigvals(warm), np.linalg.svd(warm, compute_uv=False)
    weights = load_attention(path, s)
    picks = []
    for i in range(args.direct_heads):  # first head of layer 0, last head of the last layer, ...
        layer = (s["n_layers"] - 1) * (i % 2) if i < 2 else (i * 7) % s["n_layers"]
        head = (s["n_heads"] - 1) * (i % 2) if i < 2 else (i * 5) % s["n_heads"]
        picks.append((layer, head))
    direct_times, checks = [], []
    for layer, head in picks:
        t0 = time.perf_counter()
        d = direct_head(weights[layer], head, s)
        direct_times.append(time.perf_counter() - t0)
        row = table[(table["layer"] == layer) & (table["head"] == head)].iloc[0]
        checks.append({col: abs(float(row[col]) - v) / abs(v) for col, v in d.items()})
    per_head = statistics.mean(direct_times)
    direct_total = per_head * n_total
    ratio = direct_total / ls_med

    # -- report ----------------------------------------------------------------------------------
    print(f"\n=== bench_heads: layerscope.heads vs direct d_model x d_model eigvals+svd "
          f"({'SMALL ' if args.small else ''}Qwen2-shaped) ===")
    print(f"  checkpoint   {path}")
    print(f"  shape        {s['n_layers']} layers x {s['n_heads']} q heads ({s['n_kv_heads']} kv heads), "
          f"head_dim {s['head_dim']}, d_model {s['d_model']}: {n_total} heads x 2 circuits (QK, OV)")
    print(f"  threads      torch {torch.get_num_threads()}, cores {os.cpu_count()}; direct = NumPy float64 "
          f"(np.linalg.eigvals + np.linalg.svd(compute_uv=False)) on explicit {s['d_model']}x{s['d_model']} A")
    print(f"  {'method':<44s} {'seconds':>10s}")
    print(f"  {'layerscope.heads, all heads (median of %d)' % len(ls_times):<44s} {ls_med:10.3f}"
          f"   runs: {', '.join(f'{t:.3f}' for t in ls_times)}")
    print(f"  {'layerscope per head (both circuits)':<44s} {ls_med / n_total:10.4f}")
    print(f"  {'direct per head (both circuits, measured)':<44s} {per_head:10.3f}"
          f"   heads {', '.join(f'L{l}H{h}' for l, h in picks)}: {', '.join(f'{t:.2f}' for t in direct_times)}")
    print(f"  {'direct all %d heads (EXTRAPOLATED)' % n_total:<44s} {direct_total:10.1f}"
          f"   = {per_head:.3f} s/head x {n_total}")
    print(f"  {'RATIO direct(extrapolated) / layerscope':<44s} {ratio:9.1f}x   target >= 50x: "
          f"{'PASS' if ratio >= 50 else 'FAIL'}")
    print(f"  cross-check on the directly computed heads: max relative difference vs layerscope")
    cols = list(checks[0])
    for col in cols:
        worst = max(c[col] for c in checks)
        print(f"    {col:<22s} {worst:10.2e}")
    worst_all = max(max(c.values()) for c in checks)
    print(f"    {'worst':<22s} {worst_all:10.2e}  ({'OK' if worst_all < 1e-6 else 'CHECK'}: < 1e-6)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
