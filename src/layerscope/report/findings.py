"""Findings: claims in words, each made only when it passes a test against a null, by a stated rule.

A matrix finding ("layer 4's attn.v is unusually low-rank") needs BOTH
  1. the random-matrix test: its spectrum differs from a random matrix of the same shape and scale
     (``MP_RULE``, computed per matrix by ``weights.metrics.mp``), and
  2. the peer test: its metric differs from the other layers of its weight type by a spread that has
     a floor (``depth.OUTLIER_RULE``), so a zero spread never makes an infinite score.
Either alone is not enough: every trained matrix differs from random, and a random matrix can be
apart from random peers by chance when the spread is tiny. Everything that does not pass stays in
the report's tables; an empty list is a valid result ("nothing stands out").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from . import depth

MP_RULE = (
    "Random-matrix test (Marchenko–Pastur): a random matrix of the same shape N × M (N ≥ M) and entry scale σ "
    "has its singular values below the MP bulk edge σ(√N + √M), up to Tracy–Widom fluctuations. σ is matched on the "
    "median eigenvalue (robust to the outliers being looked for). A matrix differs from random when at least one "
    "singular value lies above the edge by more than 4 Tracy–Widom scales (a spike; a Gaussian matrix shows one less "
    "than once in a thousand), or when the Kolmogorov–Smirnov distance between its eigenvalue distribution and the "
    "MP law exceeds 1.36/√M."
)
HEAVY_ALPHA = 2.0
HEAVY_RULE = (
    f"Heavy tail: power-law exponent α < {HEAVY_ALPHA:g} (WeightWatcher's 'very heavy-tailed' range), counted only for "
    "matrices that also differ from random by the Marchenko–Pastur test."
)

#: How a metric's direction reads in words.
WORDS = {
    "entropy_rank": ("is unusually low-rank", "is unusually high-rank"),
    "energy_rank_99_ratio": ("is unusually low-rank", "is unusually high-rank"),
    "stable_rank": ("is unusually low-rank", "is unusually high-rank"),
    "alpha": ("has a heavier-tailed spectrum", "has a lighter-tailed spectrum"),
    "spectral_norm": ("has an unusually small spectral norm", "has an unusually large spectral norm"),
}


@dataclass
class Finding:
    subject: str  # what the claim is about (a matrix name, a set of heads)
    text: str  # the claim, with its numbers
    tests: str  # the stated tests it passed
    score: float  # for ordering; always finite

    def __str__(self) -> str:
        return f"{self.text} [{self.tests}]"


def mp_verdicts(table: pd.DataFrame) -> pd.DataFrame:
    """Per matrix: spikes, KS distance, its critical value and whether the spectrum is random-like."""
    from ..weights.metrics.mp import is_random_like, ks_critical

    if "mp_spikes" not in table:
        return pd.DataFrame()
    mats = table[table["shape"].astype(str).str.contains("×")].copy()
    mats = mats[pd.to_numeric(mats["mp_ks"], errors="coerce").notna()]
    if mats.empty:
        return pd.DataFrame()
    m = mats["shape"].astype(str).map(lambda s: min(int(p) for p in s.split("×")))
    frame = pd.DataFrame({
        "name": mats["name"], "role": mats["role"], "layer": mats["layer"], "shape": mats["shape"],
        "mp_spikes": mats["mp_spikes"].astype(int), "mp_ks": mats["mp_ks"].astype(float),
        "KS critical": [ks_critical(int(v)) for v in m], "mp_softrank": mats.get("mp_softrank"),
    })
    frame["verdict"] = ["random-like" if is_random_like(s, k, int(mm)) else "differs from random"
                        for s, k, mm in zip(frame["mp_spikes"], frame["mp_ks"], m)]
    return frame.reset_index(drop=True)


def _layer_text(layer: Any) -> str:
    return f"layer {int(layer)}" if layer is not None and pd.notna(layer) else "no layer"


def matrix_findings(table: pd.DataFrame) -> list[Finding]:
    """Matrices that pass both the random-matrix test and the peer test, one finding per matrix."""
    outl = depth.outliers(table)
    if outl.empty:
        return []
    verdicts = mp_verdicts(table)
    mp_of = dict(zip(verdicts["name"], zip(verdicts["mp_spikes"], verdicts["mp_ks"], verdicts["KS critical"]))) \
        if len(verdicts) else {}
    passed = outl[outl["random-like"] == False]  # noqa: E712  (None: no MP columns, cannot pass)
    out = []
    for name, rows in passed.groupby("name", sort=False):
        first = rows.iloc[0]
        records = rows.to_dict("records")
        claims = list(dict.fromkeys(WORDS.get(r["metric"], ("is below its peers", "is above its peers"))[r["robust z"] > 0]
                                    for r in records))
        detail = "; ".join(f"{r['metric']} {r['value']:.4g} vs median {r['role median']:.4g} (z = {r['robust z']:+.1f})"
                           for r in records)
        spikes, ks, crit = mp_of.get(name, (math.nan, math.nan, math.nan))
        text = (f"{_layer_text(first['layer'])} {first['role']} ({name}) stands apart from its {first['role']} peers: "
                f"it {' and '.join(claims)} ({detail}). Its spectrum is not random: {int(spikes)} spike(s) above the MP edge, "
                f"KS distance {ks:.3f} (critical {crit:.3f}).")
        out.append(Finding(name, text, "random-matrix test + peer test", float(rows["robust z"].abs().max())))
    return sorted(out, key=lambda f: -f.score)


def heavy_tail_findings(table: pd.DataFrame) -> list[Finding]:
    if "alpha" not in table:
        return []
    verdicts = mp_verdicts(table)
    if verdicts.empty:
        return []
    alpha = pd.to_numeric(table.set_index("name")["alpha"], errors="coerce")
    rows = verdicts[verdicts["verdict"] == "differs from random"]
    heavy = [(n, float(alpha.get(n))) for n in rows["name"]
             if np.isfinite(alpha.get(n, np.nan)) and alpha.get(n) < HEAVY_ALPHA]
    if not heavy:
        return []
    heavy.sort(key=lambda p: p[1])
    shown = ", ".join(f"{n} (α = {a:.2f})" for n, a in heavy[:6]) + (" …" if len(heavy) > 6 else "")
    text = (f"{len(heavy)} {'matrices have' if len(heavy) > 1 else 'matrix has'} a very heavy-tailed spectrum "
            f"(α < {HEAVY_ALPHA:g}, often a sign of strongly correlated or over-trained weights): {shown}.")
    return [Finding("alpha", text, "heavy-tail rule + random-matrix test", float(HEAVY_ALPHA - heavy[0][1]))]


def model_findings(table: pd.DataFrame) -> list[Finding]:
    """Every finding about one model's matrices (heads and clusters add theirs in the report)."""
    return matrix_findings(table) + heavy_tail_findings(table)
