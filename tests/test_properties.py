"""Property tests (hypothesis) of the spectral metrics, the spectrum routes and Procrustes drift.

Matrices are built as U·diag(s)·Vᵀ from drawn singular values, so each property is checked
against the singular values it must reproduce (a closed form), on small shapes with a bounded
number of examples (the whole file runs in seconds). Discrete results (ranks, the power-law fit's
x_min) are compared only where the drawn spectrum is not within rounding of a decision boundary
(``assume``): there the float64 answer itself is a coin toss.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from layerscope.change.drift import matrix_drift  # noqa: E402
from layerscope.config import Config  # noqa: E402
from layerscope.weights.metrics import all_metrics  # noqa: E402
from layerscope.weights.metrics.powerlaw import ks_scan  # noqa: E402
from layerscope.weights.spectrum import Spectrum, singular_values  # noqa: E402

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
SPECTRAL = [m for m in all_metrics().values() if m.needs == "spectrum"]
DISCRETE = {"numerical_rank", "energy_rank_90", "energy_rank_98", "energy_rank_99", "energy_rank_90_ratio",
            "energy_rank_98_ratio", "energy_rank_99_ratio", "alpha", "alpha_weighted", "condition_number"}


def _orthogonal(n: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


@st.composite
def spectra(draw, min_side=2, max_side=24, min_sv=1e-2):
    """(m, n, s): a shape and min(m, n) singular values spread over up to four decades."""
    m = draw(st.integers(min_side, max_side))
    n = draw(st.integers(min_side, max_side))
    k = min(m, n)
    logs = draw(st.lists(st.floats(math.log10(min_sv), 2.0), min_size=k, max_size=k))
    return m, n, np.sort(10.0 ** np.array(logs))[::-1]


def _matrix(m, n, s, seed):
    k = len(s)
    return _orthogonal(m, seed)[:, :k] @ np.diag(s) @ _orthogonal(n, seed + 1)[:k, :]


def _values(w: np.ndarray) -> dict[str, float]:
    spec = singular_values(torch.from_numpy(np.ascontiguousarray(w)), "float64")
    return {m.name: float(m(spec)) for m in SPECTRAL}


def _well_separated(s: np.ndarray, levels=(0.90, 0.98, 0.99), thresh=1e-5) -> bool:
    """No decision boundary within 1e-6 relative: energy levels, the fit threshold, KS ties."""
    e = s**2
    frac = np.cumsum(e) / e.sum()
    if any(np.min(np.abs(frac - p)) < 1e-6 for p in levels):
        return False
    ev = np.sort(e)
    if np.any(np.abs(ev - thresh) < 1e-6 * ev):
        return False
    data = ev[ev > thresh]
    if len(data) >= 20:
        _, ds = ks_scan(data)
        two = np.sort(ds)[:2]
        if two[1] - two[0] < 1e-6:
            return False
    return True


def _close(a: float, b: float, rel: float = 1e-7) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= rel * max(abs(a), abs(b)) + 1e-12


@SETTINGS
@given(spectra(), st.integers(0, 10_000))
def test_singular_values_are_the_drawn_ones(case, seed):
    m, n, s = case
    spec = singular_values(torch.from_numpy(_matrix(m, n, s, seed)), "float64")
    np.testing.assert_allclose(spec.sv, s, rtol=1e-9, atol=1e-12 * s[0])


@SETTINGS
@given(spectra(), st.integers(0, 10_000), st.sampled_from(["left", "right", "both", "transpose"]))
def test_every_spectral_metric_is_orthogonally_invariant(case, seed, how):
    m, n, s = case
    assume(_well_separated(s))
    w = _matrix(m, n, s, seed)
    if how in ("left", "both"):
        w = _orthogonal(m, seed + 7) @ w
    if how in ("right", "both"):
        w = w @ _orthogonal(n, seed + 8)
    if how == "transpose":
        w = w.T
    ref = _values(_matrix(m, n, s, seed + 3))  # same singular values, other singular vectors
    got = _values(w)
    for name, value in got.items():
        assert _close(value, ref[name], 1e-6), (how, name, value, ref[name])


@SETTINGS
@given(spectra(min_sv=1e-1), st.integers(0, 10_000), st.floats(0.05, 20.0), st.booleans())
def test_scaling_laws(case, seed, c, negative):
    m, n, s = case
    assume(_well_separated(s) and _well_separated(c * s))
    w = _matrix(m, n, s, seed)
    c = -c if negative else c
    a, b = _values(w), _values(c * w)
    assert _close(b["spectral_norm"], abs(c) * a["spectral_norm"], 1e-9)
    assert _close(b["log_norm"], a["log_norm"] + 2 * math.log10(abs(c)), 1e-9)
    assert _close(b["log_spectral_norm"], a["log_spectral_norm"] + 2 * math.log10(abs(c)), 1e-9)
    for name in ("stable_rank", "numerical_rank", "entropy_rank", "condition_number", "alpha",
                 "energy_rank_90", "energy_rank_98", "energy_rank_99"):
        assert _close(b[name], a[name], 1e-7), (name, a[name], b[name])


@SETTINGS
@given(spectra(min_sv=1e-3), st.integers(0, 10_000), st.integers(0, 6))
def test_stable_rank_below_numerical_rank_below_min_side(case, seed, zeros):
    m, n, s = case
    s = s.copy()
    if zeros:
        s[-min(zeros, len(s) - 1):] = 0.0  # exactly rank deficient
    v = _values(_matrix(m, n, s, seed))
    assert v["stable_rank"] <= v["numerical_rank"] + 1e-9 <= min(m, n) + 1e-9
    assert v["numerical_rank"] == np.count_nonzero(s)
    assert 1.0 - 1e-12 <= v["entropy_rank"] <= min(m, n) + 1e-9


@SETTINGS
@given(spectra(), st.lists(st.floats(0.01, 0.99), min_size=2, max_size=6, unique=True))
def test_energy_ranks_are_monotone_in_the_level(case, levels):
    m, n, s = case
    levels = sorted(levels)
    cfg = Config(energy_levels=tuple(levels))
    spec = Spectrum(s, (m, n), "drawn")
    metrics = [m for m in all_metrics(cfg).values() if m.name.startswith("energy_rank_") and "ratio" not in m.name]
    ranks = [metrics[i](spec) for i in range(len(levels))]
    assert ranks == sorted(ranks)
    assert 1 <= ranks[0] and ranks[-1] <= len(s)


@SETTINGS
@given(st.integers(2, 20), st.integers(2, 20), st.integers(0, 10_000), st.floats(0.1, 10.0))
def test_procrustes_drift_of_a_rotated_copy_is_zero(rows, cols, seed, scale):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rows, cols)) * scale
    # the rotation acts on the smaller side, where the Procrustes cross product lives
    b = a @ _orthogonal(cols, seed + 1) if rows >= cols else _orthogonal(rows, seed + 1) @ a
    d = matrix_drift(torch.from_numpy(a), torch.from_numpy(b))
    assert d["procrustes_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert d["procrustes_residual"] <= 1e-6  # sqrt of rounding in ‖A‖² + ‖B‖² − 2‖AᵀB‖_*
    same = matrix_drift(torch.from_numpy(a), torch.from_numpy(a.copy()))
    assert same["rel_change"] == 0.0 and same["procrustes_residual"] <= 1e-6


# -- the mixed-precision route: certified values agree with float64 ------------------------------
@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10_000), st.floats(1.0, 3.0), st.sampled_from([(600, 160), (1200, 200), (400, 130)]))
def test_certified_mixed_precision_matches_float64(seed, decades, shape):
    """Whatever the mixed route certifies is within 1e-4 of the float64 route (ranks exactly)."""
    import layerscope.weights.spectrum as spectrum

    spectrum.MIXED_ENABLED = True  # off by default (see spectrum.MIXED_ENABLED)
    try:
        _check_mixed(seed, decades, shape)
    finally:
        spectrum.MIXED_ENABLED = False


def _check_mixed(seed, decades, shape):
    m, n = shape
    rng = np.random.default_rng(seed)
    s = np.sort(10.0 ** rng.uniform(-decades, 0.0, n))[::-1]
    w = torch.from_numpy(_matrix(m, n, s, seed).astype(np.float32))
    certified = []

    def certify(spec):
        ok = [metric for metric in SPECTRAL if metric.certified(spec)]
        certified[:] = ok
        return True  # accept, to compare every certified metric below

    mixed = singular_values(w, "float64", certify=certify)
    assert mixed.method in ("gram32+bound", "gram64", "gram64+refined", "svd64")
    exact = singular_values(w, "float64")
    assert exact.rel_err is None
    if mixed.rel_err is None:  # the bound could not even bracket σ_min: nothing to compare
        return
    truth = np.linalg.svd(w.numpy().astype(np.float64), compute_uv=False)
    assert np.all(np.abs(mixed.sv / truth - 1) <= mixed.rel_err)  # the stated per-σ bound holds
    for metric in certified:
        a, b = float(metric(mixed)), float(metric(exact))
        if metric.integer:
            assert a == b, metric.name
        else:
            assert _close(a, b, 1e-4), (metric.name, a, b)


# -- the float64 Gram of a wide matrix (issue 16: read along the original rows) --------------------
@pytest.mark.parametrize("shape", [(37, 300), (130, 129), (64, 9000), (300, 37), (9000, 64)])
@pytest.mark.parametrize("seed", [0, 1])
def test_float64_gram_of_tall_and_wide_layouts(seed, shape):
    """The Gram of the smaller side equals the float64 product whatever the layout: a transposed
    view (wide matrix) takes the column-block branch, spanning more than one block when m is large."""
    import layerscope.weights.spectrum as spectrum

    a = torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))
    w = a if a.shape[0] >= a.shape[1] else a.T  # as _singular_values_on passes it
    assert w.is_contiguous() == (shape[0] >= shape[1])
    before = spectrum.BLOCK_BYTES
    spectrum.BLOCK_BYTES = 64 * 8 * 1000  # 64000 / n rows per block: several blocks for the 9000-long shapes
    try:
        g = spectrum._gram(w, torch.float64).numpy()
    finally:
        spectrum.BLOCK_BYTES = before
    w64 = w.numpy().astype(np.float64)
    reference = w64.T @ w64
    assert np.array_equal(g, g.T)
    assert np.max(np.abs(g - reference)) <= 1e-13 * np.max(np.abs(reference))
