"""Hutchinson's trace estimator with Rademacher probes, for the whole operator and its blocks at once.

``tr(H) = E[vᵀ H v]`` for v with independent ±1 entries; the estimate is the sample mean and its
standard error the sample standard deviation / √n. The same samples estimate every diagonal block's
trace, ``tr(H_BB) = E[v_Bᵀ (H v)_B]`` (the off-diagonal blocks average out), so per-layer and
per-weight-type traces cost no extra Hessian-vector product.

Budget: at least ``min_samples``; then stop as soon as the standard error is at most ``rel_error``
× |estimate| (``rel_error=None``: a fixed budget), and never past ``max_samples``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch


@dataclass
class TraceEstimate:
    estimate: float
    std_error: float
    samples: int
    blocks: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (estimate, std error)

    def to_dict(self) -> dict:
        return {"estimate": self.estimate, "std_error": self.std_error, "samples": self.samples,
                "blocks": {k: list(v) for k, v in self.blocks.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "TraceEstimate":
        return cls(d["estimate"], d["std_error"], d["samples"], {k: tuple(v) for k, v in d["blocks"].items()})


def _mean_se(x: list[float]) -> tuple[float, float]:
    a = np.asarray(x, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else math.inf)


def hutchinson(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, *, min_samples: int = 10,
               max_samples: int = 100, rel_error: float | None = 0.05, seed: int = 0,
               blocks: dict[str, list[slice]] | None = None, dtype: torch.dtype = torch.float64,
               device: torch.device | str = "cpu", on_sample: Callable[[int, bool], None] | None = None) -> TraceEstimate:
    gen = torch.Generator().manual_seed(seed)
    blocks = blocks or {}
    total: list[float] = []
    per: dict[str, list[float]] = {b: [] for b in blocks}
    while len(total) < max_samples:
        v = (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(device=device, dtype=dtype)
        hv = matvec(v)
        prod = v * hv
        total.append(float(prod.sum()))
        for name, slices in blocks.items():
            per[name].append(float(sum(prod[s].sum() for s in slices)))
        est, se = _mean_se(total)
        done = len(total) >= min_samples and rel_error is not None and se <= rel_error * abs(est)
        if on_sample:
            on_sample(len(total), done)
        if done:
            break
    est, se = _mean_se(total)
    return TraceEstimate(est, se, len(total), {b: _mean_se(v) for b, v in per.items()})
