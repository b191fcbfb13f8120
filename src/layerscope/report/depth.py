"""How a metric evolves through depth: statistics, phases, shape, jumps and outliers.

Each function takes the analysis table (one row per matrix) and works per weight type (role),
averaging over experts and slices of one layer first, so a "series" is one value per layer.
The rules are stated in the text of the report (``SHAPE_RULE``, ``OUTLIER_RULE``), so a reader
can check a verdict by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

#: Metrics whose depth profile the report draws and tabulates, with their readable names.
DEPTH_METRICS = {
    "entropy_rank": "effective rank (entropy)",
    "energy_rank_99_ratio": "energy rank 99% / full rank",
    "stable_rank": "stable rank (squared Frobenius norm over squared spectral norm)",
    "alpha": "power-law exponent α (heavy tail)",
    "spectral_norm": "spectral norm (largest singular value)",
}
#: The same names as matplotlib mathtext, for figure titles and axes (headings use the words above).
MATH_LABELS = {
    "stable_rank": r"stable rank $\Vert W\Vert_F^2\,/\,\sigma_{\max}^2$",
    "alpha": r"power-law exponent $\alpha$ (heavy tail)",
    "spectral_norm": r"spectral norm $\sigma_{\max}$",
}

FLAT_TOLERANCE = 0.05
SHAPE_RULE = (
    "Layers are split into early, middle and late thirds and each third's mean is compared. "
    f"Flat: the three means differ by less than {FLAT_TOLERANCE:.0%} of the metric's mean absolute value. "
    "Otherwise increasing (early < middle < late), decreasing (early > middle > late), "
    "U-shaped (middle below both ends), inverted U (middle above both ends)."
)
OUTLIER_Z = 3.5
MIN_LAYERS = 4
REL_FLOOR = 0.05
OUTLIER_RULE = (
    f"Peer test, within each weight type and metric over at least {MIN_LAYERS} layers: z = (x − median) / s with "
    f"s = max(MAD / 0.6745, {REL_FLOOR:g} · mean |x|) — Iglewicz & Hoaglin's robust z-score, its spread floored at "
    f"{REL_FLOOR:.0%} of the metric's typical size so that near-identical layers never give a huge (or infinite) z; "
    f"a matrix is apart from its peers when |z| > {OUTLIER_Z:g}, i.e. at least {OUTLIER_Z * REL_FLOOR:.1%} of the "
    "typical size away from the median."
)


def _stacked(table: pd.DataFrame) -> bool:
    return "stack" in table.columns and table["stack"].fillna("").nunique() > 1


def layer_series(table: pd.DataFrame, role: str, metric: str) -> pd.Series:
    """``metric`` of ``role`` by layer (mean over experts and duplicate rows), NaN-free, sorted.
    With stacks (encoder-decoder) ``role`` reads "encoder attn.q": one stack's layers only."""
    if _stacked(table) and " " in role:
        stack, role = role.split(" ", 1)
        table = table[table["stack"] == stack]
    rows = table[(table["role"] == role) & table["layer"].notna()]
    if metric not in rows or rows.empty:
        return pd.Series(dtype=float)
    values = pd.to_numeric(rows[metric], errors="coerce").replace([np.inf, -np.inf], np.nan)
    series = values.groupby(rows["layer"].astype(int)).mean().dropna()
    return series.sort_index()


def layered_roles(table: pd.DataFrame) -> list[str]:
    """Weight types present in at least two layers, in the usual order (q, k, v, o, gate, up, down, ...)."""
    from ..views import MATRIX_ROLE_ORDER

    rows = table[table["layer"].notna() & table["shape"].astype(str).str.contains("×")]
    if _stacked(table):  # encoder-decoder: each stack's weight types are their own series ("encoder attn.q")
        out = []
        for stack in [s for s in ("encoder", "decoder") if s in set(rows["stack"])] + sorted(
                s for s in set(rows["stack"].fillna("")) if s not in ("encoder", "decoder")):
            out += [f"{stack} {r}" if stack else r for r in layered_roles(rows[rows["stack"] == stack].drop(columns="stack"))]
        return out
    counts = rows.groupby("role")["layer"].nunique()
    present = [r for r in counts.index if counts[r] >= 2]
    return [r for r in MATRIX_ROLE_ORDER if r in present] + sorted(r for r in present if r not in MATRIX_ROLE_ORDER)


def series_stats(series: pd.Series) -> dict[str, float]:
    """min, max, mean, median, std, range, first and last layer's value, variance, coefficient of variation."""
    x = series.to_numpy(dtype=float)
    if x.size == 0:
        return {}
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    return {
        "min": float(x.min()), "max": float(x.max()), "mean": mean, "median": float(np.median(x)), "std": std,
        "range": float(x.max() - x.min()), "first": float(x[0]), "last": float(x[-1]),
        "variance": std ** 2, "cv": std / abs(mean) if mean else math.nan,
    }


def thirds(series: pd.Series) -> tuple[float, float, float]:
    """Means of the early, middle and late thirds of the layers (the middle gets the remainder)."""
    x = series.to_numpy(dtype=float)
    n = len(x)
    k = max(1, n // 3)
    return float(x[:k].mean()), float(x[k:n - k].mean()) if n - 2 * k > 0 else math.nan, float(x[n - k:].mean())


def classify_shape(series: pd.Series) -> str:
    """increasing, decreasing, U-shaped, inverted U, flat or mixed (see ``SHAPE_RULE``); '' under 3 layers."""
    if len(series) < 3:
        return ""
    early, middle, late = thirds(series)
    scale = float(np.abs(series.to_numpy(dtype=float)).mean())
    if max(early, middle, late) - min(early, middle, late) < FLAT_TOLERANCE * scale:
        return "flat"
    if early < middle < late:
        return "increasing"
    if early > middle > late:
        return "decreasing"
    if middle < early and middle < late:
        return "U-shaped"
    if middle > early and middle > late:
        return "inverted U"
    return "mixed"


def largest_steps(series: pd.Series) -> dict[str, tuple[int, int, float] | None]:
    """The largest layer-over-layer drop and jump, as (from layer, to layer, change)."""
    if len(series) < 2:
        return {"drop": None, "jump": None}
    layers = list(series.index)
    diffs = np.diff(series.to_numpy(dtype=float))
    i, j = int(np.argmin(diffs)), int(np.argmax(diffs))
    return {"drop": (layers[i], layers[i + 1], float(diffs[i])) if diffs[i] < 0 else None,
            "jump": (layers[j], layers[j + 1], float(diffs[j])) if diffs[j] > 0 else None}


def phase_table(table: pd.DataFrame, metrics: dict[str, str] = DEPTH_METRICS) -> pd.DataFrame:
    """Per weight type and metric: the thirds' means, the shape, the largest drop and jump."""
    rows = []
    for metric in metrics:
        for role in layered_roles(table):
            s = layer_series(table, role, metric)
            if len(s) < 3:
                continue
            early, middle, late = thirds(s)
            steps = largest_steps(s)
            rows.append({
                "metric": metric, "role": role, "early": early, "middle": middle, "late": late,
                "shape": classify_shape(s),
                "largest drop": _step_text(steps["drop"], "drop"), "largest jump": _step_text(steps["jump"], "jump"),
            })
    return pd.DataFrame(rows)


def _step_text(step: tuple[int, int, float] | None, kind: str) -> str:
    return f"no {kind}" if step is None else f"{step[2]:+.3g} (layer {step[0]} → {step[1]})"


def robust_z(values: np.ndarray, rel_floor: float = REL_FLOOR) -> np.ndarray:
    """(x − median) / s with s = max(MAD / 0.6745, rel_floor · mean|x|): always finite (see ``OUTLIER_RULE``).

    The floor is what makes the score safe: identical layers (MAD = 0) give z = 0 for every layer
    that equals the median and a finite z for one that does not, never ±inf; all-zero values give 0.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return x
    med = np.median(x)
    dev = x - med
    scale = max(float(np.median(np.abs(dev))) / 0.6745, rel_floor * float(np.mean(np.abs(x))))
    if not scale > 0:  # every value is 0
        return np.zeros_like(x)
    return dev / scale


def outliers(table: pd.DataFrame, metrics: dict[str, str] = DEPTH_METRICS, z_limit: float = OUTLIER_Z,
             min_group: int = MIN_LAYERS) -> pd.DataFrame:
    """Matrices whose metric sits far from the rest of their weight type (see ``OUTLIER_RULE``).

    Each row also says whether the matrix's own spectrum is random-like by the Marchenko–Pastur
    rule (``random-like``; None when the table has no MP columns), which a finding needs too."""
    from ..weights.metrics.mp import is_random_like

    mats = table[table["shape"].astype(str).str.contains("×")]
    out = []
    for metric in metrics:
        if metric not in mats:
            continue
        for role, group in mats.groupby("role"):
            values = pd.to_numeric(group[metric], errors="coerce").replace([np.inf, -np.inf], np.nan).dropna()
            if len(values) < min_group:
                continue
            z = robust_z(values.to_numpy(dtype=float))
            med = float(values.median())
            for (idx, value), zi in zip(values.items(), z):
                if abs(zi) > z_limit:
                    row = group.loc[idx]
                    random_like = None
                    if "mp_spikes" in row and pd.notna(row.get("mp_ks")):
                        m = min(int(p) for p in str(row["shape"]).split("×"))
                        random_like = is_random_like(row["mp_spikes"], float(row["mp_ks"]), m)
                    out.append({"name": row["name"], "role": role, "layer": row["layer"], "metric": metric,
                                "value": float(value), "role median": med, "robust z": float(zi),
                                "random-like": random_like,
                                "why": f"{metric} {value:.4g} is {'above' if zi > 0 else 'below'} the {role} "
                                       f"median {med:.4g} (z = {zi:+.1f})"})
    frame = pd.DataFrame(out)
    if len(frame):
        frame = frame.reindex(frame["robust z"].abs().sort_values(ascending=False).index).reset_index(drop=True)
    return frame
