"""Independent float64 NumPy references (the direct, slow methods) for the spectral metrics and CKA."""

from __future__ import annotations

import math

import numpy as np


def ww_alpha_loop(evals: np.ndarray, thresh: float = 1e-5, min_evals: int = 8) -> float:
    """WeightWatcher 0.7's WWFit.fit_power_law_standard, transcribed loop for loop (n >= 20 only)."""
    if len(evals) < min_evals:
        return math.nan
    data = np.sort(evals[evals > thresh]).astype(np.float64)
    N = len(data)
    assert N >= 20, "reference covers the standard (n >= 20) fit"
    log_data = np.log(data)
    alphas = np.zeros(N - 1)
    Ds = np.ones(N - 1)
    for i, xmin in enumerate(data[:-1]):
        n = float(N - i)
        alpha = 1 + n / (np.sum(log_data[i:]) - n * log_data[i])
        alphas[i] = alpha
        if alpha > 1:
            Ds[i] = np.max(np.abs(1 - (data[i:] / xmin) ** (-alpha + 1) - np.arange(n) / n))
    return float(alphas[np.argmin(Ds)])


def reference_metrics(w: np.ndarray) -> dict[str, float]:
    w = np.asarray(w, dtype=np.float64)
    s = np.linalg.svd(w, compute_uv=False)
    energy = s**2
    total = energy.sum()
    out = {
        "spectral_norm": s[0],
        "stable_rank": total / s[0] ** 2,
        "numerical_rank": int(np.linalg.matrix_rank(w)),
        # singular to working precision (numerical rank deficient) means κ = inf
        "condition_number": s[0] / s[-1] if np.linalg.matrix_rank(w) == min(w.shape) else math.inf,
        "entropy_rank": math.exp(-sum(p * math.log(p) for p in s / s.sum() if p > 0)),
        "log_norm": math.log10(total),
        "log_spectral_norm": math.log10(s[0] ** 2),
    }
    for p in (0.90, 0.98, 0.99):
        k = next(i + 1 for i in range(len(s)) if energy[: i + 1].sum() >= p * total)
        tag = {0.90: "90", 0.98: "98", 0.99: "99"}[p]
        out[f"energy_rank_{tag}"] = k
        out[f"energy_rank_{tag}_ratio"] = k / min(w.shape)
    if np.count_nonzero(energy > 1e-5) >= 20:
        out["alpha"] = ww_alpha_loop(energy)
        out["alpha_weighted"] = out["alpha"] * out["log_spectral_norm"]
    return out


def reference_stats(t: np.ndarray) -> dict[str, float]:
    x = np.asarray(t, dtype=np.float64).ravel()
    return {
        "mean": x.mean(), "std": x.std(), "min": x.min(), "max": x.max(), "abs_mean": np.abs(x).mean(),
        "zero_fraction": float(np.mean(x == 0)), "frobenius_norm": float(np.sqrt(np.sum(x * x))),
    }


def kornblith_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s ``cka(gram_linear(x), gram_linear(y), debiased=True)``, NumPy float64
    (their published code, Gram-matrix form, ``center_gram(unbiased=True)``)."""
    def center_gram(gram):
        gram = gram.copy()
        n = gram.shape[0]
        np.fill_diagonal(gram, 0)
        means = np.sum(gram, 0, dtype=np.float64) / (n - 2)
        means -= np.sum(means) / (2 * (n - 1))
        gram -= means[:, None]
        gram -= means[None, :]
        np.fill_diagonal(gram, 0)
        return gram

    gx, gy = center_gram(x @ x.T), center_gram(y @ y.T)
    return float(gx.ravel().dot(gy.ravel()) / (np.linalg.norm(gx) * np.linalg.norm(gy)))
