"""Start-up time of the ``layerscope`` command: ``--help``, ``--version`` and ``info`` on a small file.

Each command runs as a fresh ``python -m layerscope ...`` process (what a user's shell does), with
``PYTHONPATH`` set to ``--src`` (default: this checkout's ``src``), ``--repeats`` times; the best wall
time is kept (the least disturbed by other load on the machine). The baseline is ``python -c pass``,
measured in the same run, so the ratio says how much layerscope adds to a bare interpreter.
Target (issue 10): ``--help`` and ``--version`` under 0.5 s. For ``info`` the target is that
matplotlib and scikit-learn are not imported; its time is printed for reference.
One more ``python -X importtime`` run per command lists the top-level packages it imported and the
slowest of them (cumulative import time).

``python bench/bench_startup.py [--src DIR] [--repeats 5]``   (compare trees: ``--src /tmp/old/src``)
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET_S = 0.5
WATCH = ("torch", "pandas", "numpy", "matplotlib", "sklearn", "scipy", "transformers", "numba", "rich")


def small_safetensors(path: Path) -> Path:
    """A two-tensor float32 safetensors file written by hand (no torch needed to make it)."""
    tensors = {"model.embed_tokens.weight": (64, 16), "model.layers.0.mlp.down_proj.weight": (16, 48)}
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4 * shape[0] * shape[1]
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return path


def wall(cmd: list[str], env: dict, repeats: int) -> tuple[float, subprocess.CompletedProcess]:
    best, proc = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        best = min(best, time.perf_counter() - t0)
    return best, proc


def imports(argv: list[str], env: dict) -> tuple[set[str], list[tuple[float, str]]]:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "layerscope", *argv], capture_output=True,
                          text=True, env=env)
    top: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "cumulative" not in line:
            _, cumulative, name = line[len("import time:"):].split("|")
            pkg = name.strip().split(".")[0]
            if name.strip() == pkg:  # the package's own line carries its cumulative time
                top[pkg] = max(top.get(pkg, 0.0), int(cumulative) / 1e6)
    return set(top), sorted(((v, k) for k, v in top.items()), reverse=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=str(HERE.parent / "src"), help="the layerscope sources to time (PYTHONPATH)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": args.src, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        env["LAYERSCOPE_CACHE_DIR"] = tmp
        st = small_safetensors(Path(tmp) / "small.safetensors")
        base, _ = wall([sys.executable, "-c", "pass"], env, args.repeats)
        print(f"sources: {args.src}; best of {args.repeats}; baseline python -c pass: {base:.3f} s")
        print(f"{'command':<28} {'best s':>7} {'× baseline':>10} {'target':>8} {'met':>4}  heavy packages imported")
        all_met = True
        for argv, target in ((["--help"], TARGET_S), (["--version"], TARGET_S), (["info", str(st)], None)):
            seconds, proc = wall([sys.executable, "-m", "layerscope", *argv], env, args.repeats)
            if proc.returncode != 0:
                print(f"{' '.join(argv)} failed: {proc.stderr.strip()[-300:]}")
                return 1
            packages, top = imports(argv, env)
            heavy = [p for p in WATCH if p in packages]
            if target is not None:
                met = seconds < target
                verdict = (f"< {target:g} s", "yes" if met else "NO")
            else:  # info: the target is what it must not import
                met = not {"matplotlib", "sklearn"} & packages
                verdict = ("no mpl/skl", "yes" if met else "NO")
            all_met &= met
            label = "info small.safetensors" if argv[0] == "info" else " ".join(argv)
            print(f"{label:<28} {seconds:7.3f} {seconds / base:10.1f} {verdict[0]:>8} {verdict[1]:>4}  {', '.join(heavy) or 'none'}")
            print(f"{'':<28} slowest imports: " + ", ".join(f"{name} {s:.2f} s" for s, name in top[:4]))
    print("all targets met" if all_met else "target NOT met")
    return 0 if all_met else 1


if __name__ == "__main__":
    sys.exit(main())
