"""Run a benchmark's measurement in a fresh process (so earlier allocations do not count)."""

from __future__ import annotations

import json
import subprocess
import sys


def run_child(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd`` and return the JSON it prints on its last ``RESULT `` line; exit loudly on failure."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"child failed with exit code {proc.returncode}: {' '.join(cmd)}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])
