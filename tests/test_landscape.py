"""Loss landscapes against closed forms, direct row-by-row computations and nanoGPT's own loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layerscope.errors import LayerscopeError
from layerscope.probes import from_module, from_pairs, load_data, load_model
from layerscope.probes.landscape import Family, filter_normalise, landscape, random_directions

SMALL = dict(seq_len=32, batches=2, batch_size=4)


class Point(torch.nn.Module):
    """A model whose output is its own parameter vector: the loss is then any function of w."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.as_tensor(w, dtype=torch.float64).clone())

    def forward(self, x):
        return self.w


def test_interpolation_on_a_quadratic_equals_the_closed_form(tmp_path):
    rng = np.random.default_rng(0)
    n = 6
    q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    a = q @ np.diag([3.0, 1.0, 0.5, -0.2, -1.0, -2.5]) @ q.T  # indefinite: the line can rise above the chord
    b = rng.standard_normal(n)
    wa, wb = rng.standard_normal(n), rng.standard_normal(n)
    delta = wb - wa
    if delta @ a @ delta > 0:  # make the path cross the negative-curvature side
        wb = wa - delta
        delta = wb - wa
    A, B = torch.tensor(a), torch.tensor(b)

    def loss_fn(w, y):
        return 0.5 * w @ A @ w + B @ w

    def closed(w):
        return 0.5 * w @ a @ w + b @ w

    data = [(torch.zeros(1, 1), torch.zeros(1))]
    for ppf in (1, 8):  # one point per forward, and 8 points stacked through vmap
        result = landscape([Point(wa), Point(wb)], data, loss_fn=loss_fn, points=11, extend=0.3,
                           points_per_forward=ppf, store=tmp_path / f"s{ppf}.sqlite")
        alphas = result.table["alpha"].to_numpy()
        assert alphas.min() == pytest.approx(-0.3) and alphas.max() == pytest.approx(1.3) and len(alphas) == 17
        expected = [closed(wa + al * delta) for al in alphas]
        np.testing.assert_allclose(result.table["loss"].to_numpy(), expected, rtol=1e-12, atol=1e-12)
        # L(α) − chord = −½ α(1−α) ΔᵀAΔ: largest at α = 1/2, height −ΔᵀAΔ/8
        assert result.summary["barrier"] == pytest.approx(-(delta @ a @ delta) / 8, rel=1e-10)
        assert result.summary["barrier_alpha"] == pytest.approx(0.5)


def test_identical_checkpoints_have_no_barrier(trained_run, tmp_path):
    ckpt = trained_run["checkpoints"][-1]
    result = landscape([ckpt, ckpt], points=5, store=tmp_path / "s.sqlite", **SMALL)
    assert result.summary["barrier"] == 0.0 and not result.summary["has_barrier"]
    assert result.table["loss"].nunique() == 1


def _output_rows(name: str, w: np.ndarray, conv1d: bool) -> np.ndarray:
    """Direct: GPT-2 Conv1D weights are (in, out), so output units are columns; else rows."""
    return w.T if conv1d else w


def test_filter_normalisation_row_by_row(arch_checkpoints):
    for arch in ("gpt2", "llama"):
        model = load_model(arch_checkpoints[arch])
        gen = torch.Generator().manual_seed(3)
        raw = {n: torch.randn(tuple(p.shape), generator=gen) for n, p in model.params.items()}
        got = filter_normalise(model, raw)
        checked = 0
        for name, p in model.params.items():
            d, w, r = got[name].double().numpy(), p.detach().double().numpy(), raw[name].double().numpy()
            if p.dim() == 1 or "norm" in name or "ln_" in name:
                assert not d.any(), name  # biases and norm weights: zero direction
                continue
            conv1d = arch == "gpt2" and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
            rows_d, rows_w, rows_r = (_output_rows(name, x, conv1d) for x in (d, w, r))
            for j in range(rows_w.shape[0]):
                expected = rows_r[j] / np.linalg.norm(rows_r[j]) * np.linalg.norm(rows_w[j])
                np.testing.assert_allclose(rows_d[j], expected, rtol=1e-5, atol=1e-7)
            checked += 1
        assert checked >= 4 * model.anatomy.dims.n_layers


def _nanogpt_state(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-2 layout back to nanoGPT's (Conv1D (in, out) -> Linear (out, in); tied head)."""
    from layerscope.probes.model import CONV1D_SUFFIXES

    state = {n: (t.T if n.endswith(CONV1D_SUFFIXES) else t).contiguous() for n, t in weights.items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def test_grid_point_loss_equals_a_model_built_with_those_weights(trained_run, tmp_path):
    from nanogpt_model import GPT, GPTConfig

    ckpt = trained_run["checkpoints"][-1]
    stacked = landscape([ckpt], grid=3, span=0.4, seed=7, points_per_forward=9, store=tmp_path / "a.sqlite", **SMALL)
    single = landscape([ckpt], grid=3, span=0.4, seed=7, points_per_forward=1, store=tmp_path / "b.sqlite", **SMALL)
    np.testing.assert_allclose(stacked.table["loss"], single.table["loss"], rtol=2e-5)
    model = load_model(ckpt)
    data = load_data(model, None, **SMALL)
    family = Family({n: p.detach() for n, p in model.params.items()}, random_directions(model, 2, seed=7), "")
    saved = torch.load(ckpt, weights_only=True)
    for x, y in ((0.4, -0.4), (-0.4, 0.0), (0.0, 0.0)):
        ref = GPT(GPTConfig(**saved["model_args"]))
        ref.load_state_dict(_nanogpt_state(family.weights((x, y))))
        ref.eval()
        with torch.no_grad():
            own = sum(float(ref(data.input_ids[b], data.labels[b])[1]) for b in range(data.n_batches)) / data.n_batches
        row = stacked.table[(stacked.table["x"] == x) & (stacked.table["y"] == y)]
        assert float(row["loss"].iloc[0]) == pytest.approx(own, rel=2e-5)
    centre = stacked.summary["loss_centre"]
    assert centre == pytest.approx(float(stacked.table.query("x == 0 and y == 0")["loss"].iloc[0]))


def test_grid_is_deterministic_under_its_seed_and_resumes(trained_run, tmp_path):
    ckpt = trained_run["checkpoints"][-1]
    model = load_model(ckpt)
    a, b, c = (random_directions(model, 2, seed=s) for s in (5, 5, 6))
    for name in a[0]:
        assert torch.equal(a[0][name], b[0][name]) and torch.equal(a[1][name], b[1][name])
    assert any(not torch.equal(a[0][n], c[0][n]) for n in a[0] if a[0][n].any())
    full = landscape([ckpt], grid=5, span=0.5, seed=5, points_per_forward=4, store=tmp_path / "full.sqlite", **SMALL)
    # a grid stopped after its first chunk resumes from the store, and gives the same numbers
    calls = []

    def stop(name, done, total, note=None):
        calls.append(done)
        if done >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        landscape([ckpt], grid=5, span=0.5, seed=5, points_per_forward=4, store=tmp_path / "part.sqlite",
                  progress=stop, **SMALL)
    again = landscape([ckpt], grid=5, span=0.5, seed=5, points_per_forward=4, store=tmp_path / "part.sqlite", **SMALL)
    assert again.cached == 8 and again.computed == 17
    np.testing.assert_array_equal(again.table["loss"].to_numpy(), full.table["loss"].to_numpy())
    coarse = landscape([ckpt], grid=3, span=0.5, seed=5, store=tmp_path / "full.sqlite", **SMALL)
    assert coarse.cached == 9 and coarse.computed == 0  # a coarser grid's points are all in the finer one
    other = landscape([ckpt], grid=3, span=0.5, seed=6, points_per_forward=9, store=tmp_path / "full.sqlite", **SMALL)
    assert other.cached == 0  # the directions are part of the key
    assert not np.allclose(other.table["loss"], coarse.table["loss"])
    xs, ys, z = full.grid()
    assert z.shape == (5, 5) and full.summary["roughness"] >= 0 and math.isfinite(full.summary["curvature_x"])


def test_plane_through_three_checkpoints(trained_run, tmp_path):
    c1, c2, c3 = trained_run["checkpoints"][-3:]
    result = landscape([c1, c2, c3], grid=4, store=tmp_path / "s.sqlite", **SMALL)
    marks = list(result.marks.values())
    assert marks[0] == (0.0, 0.0) and marks[1] == (1.0, 0.0) and marks[2][1] > 0
    assert result.table.shape[0] == 16 and result.summary["roughness"] >= 0
    # θ(x3, y3) on the plane is the third checkpoint
    models = [load_model(c) for c in (c1, c2, c3)]
    origin = {n: p.detach() for n, p in models[0].params.items()}
    u = {n: models[1].params[n].detach() - origin[n] for n in origin}
    w = {n: models[2].params[n].detach() - origin[n] for n in origin}
    uu = sum(float((t.double() ** 2).sum()) for t in u.values())
    uw = sum(float((u[n].double() * w[n].double()).sum()) for n in u)
    v = {n: w[n] - uw / uu * u[n] for n in u}
    vv = sum(float((t.double() ** 2).sum()) for t in v.values())
    fam = Family(origin, [u, {n: t * math.sqrt(uu / vv) for n, t in v.items()}], "")
    at3 = fam.weights(marks[2])
    for n in origin:
        torch.testing.assert_close(at3[n], models[2].params[n].detach(), atol=1e-5, rtol=1e-4)


def test_bad_landscape_input_is_one_line(trained_run, arch_checkpoints):
    ckpt = trained_run["checkpoints"][-1]
    for kwargs, message in ((dict(grid=4), "odd"), (dict(directions="pca"), "random or hessian"),
                            (dict(span=0), "--span")):
        with pytest.raises(LayerscopeError, match=message):
            landscape([ckpt], **kwargs)
    with pytest.raises(LayerscopeError, match="same parameters|shape"):
        landscape([ckpt, arch_checkpoints["llama"]], **SMALL)
    with pytest.raises(LayerscopeError, match="one, two or three"):
        landscape([ckpt] * 4)


def test_hessian_directions_are_the_top_eigenvectors_of_a_quadratic(tmp_path):
    from layerscope.probes import Objective
    from layerscope.probes.landscape import hessian_directions, weight_norm

    rng = np.random.default_rng(1)
    n = 8
    q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    evals = np.array([5.0, 3.0, 1.0, 0.5, 0.2, -0.1, -0.3, -1.0])
    a = q @ np.diag(evals) @ q.T
    A = torch.tensor(a)
    w0 = rng.standard_normal(n)

    def loss_fn(w, y):
        return 0.5 * w @ A @ w

    data = from_pairs([(torch.zeros(1, 1), torch.zeros(1))])
    model = from_module(Point(w0), loss_fn)
    values, vecs = hessian_directions(Objective(model, data), 2, tol=1e-8)
    np.testing.assert_allclose(values, evals[:2], rtol=1e-6)
    for v, i in zip(vecs, (0, 1)):
        got = v["w"].numpy()
        assert abs(abs(got @ q[:, i]) - 1) < 1e-6 and np.linalg.norm(got) == pytest.approx(1.0)
    # the 2-D landscape along them is the closed form at every point
    result = landscape([Point(w0)], data, loss_fn=loss_fn, directions="hessian", grid=3, span=0.5, hessian_tol=1e-8,
                       store=tmp_path / "s.sqlite")
    scale = weight_norm(model)
    d1, d2 = (v["w"].numpy() * scale for v in vecs)
    for row in result.table.itertuples():
        w = w0 + row.x * d1 + row.y * d2
        assert row.loss == pytest.approx(0.5 * w @ a @ w, rel=1e-9)
