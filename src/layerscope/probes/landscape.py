"""Loss landscapes: the probe loss along a line between two checkpoints, or on a plane.

Every landscape is an affine family of weights ``θ(c) = origin + Σ_i c_i · d_i`` evaluated on the
same fixed, hashed batches at every point:

* **1-D interpolation** between checkpoints A and B: origin θ_A, one direction θ_B − θ_A (every
  parameter, biases and norms included), α from 0 to 1 in ``points`` steps, extended by ``extend``
  past both ends on request. The **barrier** is max over α in [0, 1] of
  L(α) − ((1 − α) L(0) + α L(1)), with the α where it sits (linear mode connectivity, Frankle et
  al. 2020). It is called a barrier only when it is above ``max(2 · SE, 1% of (L(0) + L(1)) / 2)``,
  SE being the standard error of the same quantity over the probe batches (the rule is in
  :data:`BARRIER_RULE`).
* **2-D around one checkpoint** along two seeded Gaussian directions, filter-normalised as in Li et
  al. 2018: each output row (a matrix's output unit, an embedding's token row; a GPT-2 ``Conv1D``
  stores its output units as columns, and the anatomy says so) of a direction is rescaled to the
  norm of the same row of the weights, and the directions of biases and norm weights are zero.
  Or along the top-2 Hessian eigenvectors (unit eigenvectors rescaled to the norm of the weights,
  so ``span`` means the same in both).
* **2-D on the plane through three checkpoints** (Garipov et al. 2018): axes u = θ_2 − θ_1 and the
  part of θ_3 − θ_1 orthogonal to u, rescaled to ‖u‖, so θ_1 = (0, 0) and θ_2 = (1, 0).

Several grid points are evaluated per forward: the weights of K points are stacked and
``torch.func.vmap`` runs ``functional_call`` over them (batched matrix products instead of K
forwards), K chosen from a memory budget and halved on out-of-memory. Each point's per-batch loss
sums are stored as soon as they exist, keyed by (weights hashes, data hash, directions, point), so
a stopped grid resumes and a finer grid reuses the points it shares with a coarser one.
:class:`PointEvaluator` takes a *list* of points and returns their results: that is the unit an
executor (a thread pool, a Ray cluster) receives through ``map_fn``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import LayerscopeError
from .data import ProbeData
from .model import RunnableModel, check_same_parameters
from .objective import Objective

Progress = Callable[[str, int, int, str | None], None]
KIND = "landscape.point"
ZERO_ROLES = ("norm", "bias")
BARRIER_RULE = ("a barrier is claimed when max_α [L(α) − ((1−α)L(0) + αL(1))] over α in [0, 1] exceeds both twice its "
                "standard error over the probe batches and 1% of the mean end-point loss; below that the two "
                "checkpoints are linearly connected on this data")
ROUGHNESS_RULE = ("roughness = Σ over grid lines of the total variation Σ|ΔL|, divided by the least total variation "
                  "a line with the same end points and minimum can have (one valley), minus 1: 0 when every grid "
                  "row and column is a single valley, larger with every extra rise and fall")
SHARPNESS_RULE = ("curvature = second difference (L(+h) + L(−h) − 2 L(0)) / h² at the centre along each axis, h the grid "
                  "step; ε-sharpness = 100 · (max L over the 8 neighbours of the centre − L(0)) / (1 + L(0)) "
                  "(Keskar et al. 2017, with ε one grid step)")


# -- directions -----------------------------------------------------------------------------------
def _zeroed(model: RunnableModel, name: str, tensor: torch.Tensor) -> bool:
    entry = model.anatomy.entries.get(name)
    role = entry.role if entry is not None else "other"
    return tensor.dim() <= 1 or role in ZERO_ROLES or name.endswith(".bias")


def _rows_view(model: RunnableModel, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as (output units, everything else): the rows filter normalisation rescales."""
    entry = model.anatomy.entries.get(name)
    if tensor.dim() == 2 and entry is not None and entry.transposed:  # Conv1D: (in, out)
        return tensor.T
    if tensor.dim() == 3:  # stacked experts (E, ...): one row per expert and output unit of the last dim
        return tensor.reshape(-1, tensor.shape[-1])
    return tensor.reshape(tensor.shape[0], -1)


def filter_normalise(model: RunnableModel, direction: dict[str, torch.Tensor],
                     weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Li et al. 2018: each output row of ``direction`` rescaled to the norm of the weights' row;
    biases and norm weights zero. Returns new tensors."""
    weights = weights or {n: p.detach() for n, p in model.params.items()}
    out = {}
    for name, d in direction.items():
        w = weights[name]
        if _zeroed(model, name, w):
            out[name] = torch.zeros_like(d)
            continue
        d = d.clone()
        rows_d, rows_w = _rows_view(model, name, d), _rows_view(model, name, w)
        scale = rows_w.norm(dim=1, keepdim=True) / (rows_d.norm(dim=1, keepdim=True) + 1e-10)
        rows_d.mul_(scale)  # a view of d (for Conv1D a transposed view): scales d in place
        out[name] = d
    return out


def random_directions(model: RunnableModel, n: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` seeded Gaussian directions, filter-normalised. Drawn on the CPU in float32 in parameter
    name order, so the same seed gives the same directions on every device."""
    gen = torch.Generator().manual_seed(int(seed))
    weights = {name: p.detach() for name, p in model.params.items()}
    dirs = []
    for _ in range(n):
        raw = {name: torch.randn(tuple(w.shape), generator=gen, dtype=torch.float32).to(w.device, w.dtype)
               for name, w in sorted(weights.items())}
        dirs.append(filter_normalise(model, {name: raw[name] for name in weights}, weights))
    return dirs


def weight_norm(model: RunnableModel) -> float:
    """‖θ‖ over the tensors filter normalisation keeps (biases and norms left out); over every
    parameter when that leaves nothing, and 1 for all-zero weights."""
    kept = sum(float(p.detach().double().pow(2).sum()) for n, p in model.params.items() if not _zeroed(model, n, p))
    if kept == 0:
        kept = sum(float(p.detach().double().pow(2).sum()) for p in model.params.values())
    return math.sqrt(kept) if kept > 0 else 1.0


def hessian_directions(objective: Objective, k: int = 2, *, seed: int = 0, tol: float = 1e-3,
                       max_iter: int = 100) -> tuple[np.ndarray, list[dict[str, torch.Tensor]]]:
    """The top-``k`` Hessian eigenvalues and unit eigenvectors (sign fixed: largest entry positive).

    Uses the curvature probe's Lanczos (``probes.curvature.top_eigenvectors``) when this build has it,
    else ARPACK (``scipy.sparse.linalg.eigsh``) on exact Hessian-vector products (double backward)."""
    try:
        from .curvature import top_eigenvectors  # the curvature probe (Lanczos with full reorthogonalisation)
    except ImportError:
        top_eigenvectors = None
    if top_eigenvectors is not None:
        values, vectors = top_eigenvectors(objective, k, tol=tol, max_iter=max_iter, seed=seed)
        values = np.asarray(values, dtype=float)
    else:
        values, vectors = _eigsh_top(objective, k, seed=seed, tol=tol, max_iter=max_iter)
    fixed = []
    for v in vectors:
        flat = torch.cat([t.reshape(-1) for t in v.values()])
        sign = 1.0 if float(flat[flat.abs().argmax()]) >= 0 else -1.0
        norm = float(flat.double().norm())
        fixed.append({n: t * (sign / norm) for n, t in v.items()})
    return values, fixed


def _eigsh_top(objective: Objective, k: int, *, seed: int, tol: float, max_iter: int):
    from scipy.sparse.linalg import LinearOperator, eigsh

    model = objective.model
    names = list(model.params)
    params = [model.params[n] for n in names]
    sizes = [p.numel() for p in params]
    dim = sum(sizes)

    def hvp(v: np.ndarray) -> np.ndarray:
        pieces = [torch.as_tensor(c, dtype=p.dtype, device=p.device).view(p.shape)
                  for c, p in zip(np.split(np.asarray(v, dtype=np.float64).ravel(), np.cumsum(sizes)[:-1]), params)]
        total = [torch.zeros_like(p) for p in params]
        for b in range(objective.n_batches):
            loss = objective.batch_term(b)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            hv = torch.autograd.grad(grads, params, grad_outputs=pieces, allow_unused=True)
            total = [t + (h if h is not None else 0) for t, h in zip(total, hv)]
        return torch.cat([t.detach().reshape(-1) for t in total]).double().cpu().numpy()

    rng = np.random.default_rng(seed)
    op = LinearOperator((dim, dim), matvec=hvp, dtype=np.float64)
    values, vecs = eigsh(op, k=k, which="LA", tol=tol, maxiter=max_iter * dim, v0=rng.standard_normal(dim))
    order = np.argsort(values)[::-1]
    out = []
    for i in order:
        chunks = np.split(vecs[:, i], np.cumsum(sizes)[:-1])
        out.append({n: torch.as_tensor(c, dtype=p.dtype, device=p.device).view(p.shape)
                    for n, c, p in zip(names, chunks, params)})
    return values[order], out


# -- the affine family and its points ---------------------------------------------------------------
@dataclass
class Family:
    """θ(c) = origin + Σ c_i d_i. ``spec`` names the directions in store keys (with the hashes)."""

    origin: dict[str, torch.Tensor]
    directions: list[dict[str, torch.Tensor]]
    spec: str
    labels: tuple[str, ...] = ("x", "y")

    def weights(self, coords: Sequence[float]) -> dict[str, torch.Tensor]:
        """The weights at one point (what a model built at that point holds)."""
        out = {}
        for name, o in self.origin.items():
            t = o.clone()
            for c, d in zip(coords, self.directions):
                if name in d and c != 0:
                    t.add_(d[name], alpha=float(c))
            out[name] = t
        return out

    def stacked(self, coords: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weights of K points at once, stacked on a new first dimension: (K, *shape)."""
        out = {}
        for name, o in self.origin.items():
            t = o.unsqueeze(0).expand(coords.shape[0], *o.shape).clone()
            for i, d in enumerate(self.directions):
                if name in d:
                    c = coords[:, i].to(o.dtype).view(-1, *([1] * o.dim()))
                    t.add_(c * d[name].unsqueeze(0))
            out[name] = t
        return out


def point_text(coords: Sequence[float]) -> str:
    """A point's store-key part: coordinates rounded to 10 decimals (linspace noise removed)."""
    return ",".join(repr(round(float(c), 10) + 0.0) for c in coords)


class PointEvaluator:
    """The probe loss at a list of points of a :class:`Family`: the unit of work for an executor.

    ``points_per_forward`` points are stacked and evaluated with one ``vmap``'d forward per batch
    (1: a plain ``functional_call`` per point). Returns, per point, the per-batch loss sums."""

    def __init__(self, objective: Objective, family: Family, points_per_forward: int = 1, calibrate: bool = False):
        self.objective, self.family = objective, family
        self.points_per_forward = max(1, int(points_per_forward))
        # stacking pays on GPUs and on busy CPUs, not always on an idle single-threaded CPU: with
        # calibrate, the first call times a stacked chunk against two single points and keeps the faster
        self.calibrate = calibrate and self.points_per_forward > 1
        self.batches = [tuple(objective._to_device(t) for t in objective.data.batch(b)) for b in range(objective.n_batches)]

    def __call__(self, points: Sequence[Sequence[float]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        i = 0
        if self.calibrate and len(points) >= self.points_per_forward + 2:
            self.calibrate = False
            k = self.points_per_forward
            t0 = time.perf_counter()
            sums = self._sums(points[:k])
            stacked = (time.perf_counter() - t0) / k
            t0 = time.perf_counter()
            sums += self._sums(points[k:k + 1]) + self._sums(points[k + 1:k + 2])
            single = (time.perf_counter() - t0) / 2
            out.extend({"coords": [float(c) for c in p], "sums": s} for p, s in zip(points[:k + 2], sums))
            i = k + 2
            if single < stacked:
                self.points_per_forward = 1
        while i < len(points):
            chunk = points[i:i + self.points_per_forward]
            try:
                sums = self._sums(chunk)
            except torch.OutOfMemoryError:
                if self.points_per_forward == 1:
                    raise LayerscopeError("out of memory evaluating one landscape point: use fewer or smaller batches") from None
                self.points_per_forward = max(1, self.points_per_forward // 2)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            out.extend({"coords": [float(c) for c in p], "sums": s} for p, s in zip(chunk, sums))
            i += len(chunk)
        return out

    def _sums(self, chunk: Sequence[Sequence[float]]) -> list[list[float]]:
        obj = self.objective
        with torch.no_grad():
            if len(chunk) == 1:
                params = self.family.weights(chunk[0])
                return [[float(obj._call(params, x, y)) for x, y in self.batches]]
            coords = torch.tensor([list(p) for p in chunk], dtype=torch.float64)
            stacked = self.family.stacked(coords.to(next(iter(self.family.origin.values())).device))
            cols = []
            for x, y in self.batches:
                cols.append(torch.func.vmap(lambda p: obj._call(p, x, y))(stacked).double().cpu())
            table = torch.stack(cols, dim=1)  # (K, batches)
            return table.tolist()


def auto_points_per_forward(objective: Objective, budget_bytes: int | None = None, cap: int = 64) -> int:
    """How many points fit in one forward: parameter copies plus one batch's activations per point."""
    model = objective.model
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    param_bytes = sum(p.numel() for p in model.params.values()) * itemsize
    if objective.data.input_ids is not None:
        _, b, t = objective.data.input_ids.shape
        d = model.anatomy.dims
        per_token = (d.d_model or 256) * max(1, d.n_layers or 1) * 24 + 2 * (model.vocab_size or 256)
        act = b * t * per_token * itemsize + b * (d.n_heads or 1) * t * t * itemsize * max(1, d.n_layers or 1) * 2
    else:
        act = 4 * param_bytes
    if budget_bytes is None:
        if model.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(model.device)
            budget_bytes = int(free * 0.5)
        else:
            budget_bytes = 1 << 30
    return int(max(1, min(cap, budget_bytes // max(1, 2 * param_bytes + act))))


# -- running a set of points through the store --------------------------------------------------
def evaluate_points(evaluator: Callable[[list], list[dict]], points: list[tuple[float, ...]], *, key: str,
                    store: Any = None, chunk: int = 1, map_fn: Callable = map, progress: Progress | None = None,
                    label: str = "points") -> tuple[dict[str, dict], int]:
    """Every point's result (by :func:`point_text`) and how many came from the store; the rest are
    evaluated through ``map_fn(evaluator, chunks)`` (``map``, or an executor's map) and stored as
    each chunk returns, so an interrupted grid resumes."""
    texts = [point_text(p) for p in points]
    results: dict[str, dict] = {}
    if store is not None:
        wanted = set(texts)
        for payload in store.artifacts(key, KIND):
            t = point_text(payload["coords"])
            if t in wanted:
                results[t] = payload
    pending = [p for p, t in zip(points, texts) if t not in results]
    total, done = len(points), len(points) - len(pending)
    chunks = [pending[i:i + chunk] for i in range(0, len(pending), chunk)]
    started, computed = time.perf_counter(), 0
    if progress:
        progress(label, done, total, f"{done} from the store" if done else None)
    for out in map_fn(evaluator, chunks):
        for r in out:
            t = point_text(r["coords"])
            results[t] = r
            if store is not None:
                store.put_artifact(key, KIND, t, r)
        done += len(out)
        computed += len(out)
        if progress:
            rate = computed / max(1e-9, time.perf_counter() - started)
            progress(label, done, total, f"{rate:.1f} points/s")
    return results, total - computed


def _key(*parts: str) -> str:
    return "landscape:" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


# -- results ------------------------------------------------------------------------------------------
@dataclass
class LandscapeResult:
    """``table``: one row per point (coordinates, loss, per-batch losses in ``batch_losses``);
    ``summary``: barrier (1-D) or roughness and sharpness (2-D), with the rules they follow."""

    kind: str  # "interpolation", "random", "hessian" or "plane"
    table: Any  # pandas DataFrame
    summary: dict[str, Any]
    labels: list[str]
    data_description: str
    seconds: float = 0.0
    computed: int = 0
    cached: int = 0
    marks: dict[str, tuple[float, float]] = field(default_factory=dict)  # checkpoints on a plane

    def grid(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(xs, ys, Z) with Z[j, i] the loss at (xs[i], ys[j]) (2-D only)."""
        xs = np.sort(self.table["x"].unique())
        ys = np.sort(self.table["y"].unique())
        z = self.table.pivot(index="y", columns="x", values="loss").reindex(index=ys, columns=xs).to_numpy(float)
        return xs, ys, z

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "models": self.labels, "data": self.data_description, "summary": self.summary,
                "marks": {k: list(v) for k, v in self.marks.items()},
                "points": json.loads(self.table.drop(columns=["batch_losses"]).to_json(orient="records"))}

    def save(self, path: str | Path) -> Path:
        """``.json`` (summary and points) or a table file (.csv/.parquet) of the points."""
        from ..views import write_json, write_table

        path = Path(path)
        if path.suffix.lower() == ".json":
            return write_json(self.to_dict(), path)
        return write_table(self.table.drop(columns=["batch_losses"]), path)

    def plot(self, directory: str | Path) -> list[Path]:
        from .. import plots

        if self.kind == "interpolation":
            return [plots.landscape_line(self, directory)]
        return plots.landscape_plane(self, directory)


def _frame(results: dict[str, dict], points: list[tuple[float, ...]], objective: Objective, columns: Sequence[str]):
    import pandas as pd

    counts = np.asarray(objective.counts, dtype=float)
    rows = []
    for p in points:
        r = results[point_text(p)]
        sums = np.asarray(r["sums"], dtype=float)
        rows.append({**{c: float(v) for c, v in zip(columns, p)}, "loss": float(sums.sum() / objective.total),
                     "batch_losses": (sums / counts).tolist()})
    return pd.DataFrame(rows)


def barrier(table, counts: Sequence[float]) -> dict[str, Any]:
    """Barrier height, where it sits, its standard error over batches, and the rule's verdict."""
    inside = table[(table["alpha"] >= -1e-12) & (table["alpha"] <= 1 + 1e-12)].sort_values("alpha")
    a = inside["alpha"].to_numpy(float)
    loss = inside["loss"].to_numpy(float)
    l0, l1 = loss[0], loss[-1]
    gap = loss - ((1 - a) * l0 + a * l1)
    i = int(np.argmax(gap))
    height = float(max(0.0, gap[i]))
    per_batch = np.asarray(inside["batch_losses"].tolist(), dtype=float)  # (points, batches)
    w = np.asarray(counts, dtype=float) / float(np.sum(counts))
    b_gap = per_batch[i] - ((1 - a[i]) * per_batch[0] + a[i] * per_batch[-1])
    nb = len(w)
    if nb > 1:
        mean = float(np.sum(w * b_gap))
        se = float(math.sqrt(np.sum(w ** 2 * (b_gap - mean) ** 2) * nb / (nb - 1)))  # SE of a weighted mean
    else:
        se = math.nan
    floor = 0.01 * (l0 + l1) / 2
    threshold = float(max(2 * se if math.isfinite(se) else 0.0, floor))
    return {"loss_start": float(l0), "loss_end": float(l1), "barrier": height, "barrier_alpha": float(a[i]),
            "barrier_se": se, "barrier_threshold": threshold, "has_barrier": bool(height > threshold),
            "max_loss": float(loss.max()), "rule": BARRIER_RULE}


def roughness(z: np.ndarray) -> dict[str, float]:
    """Total variation of the grid and its excess over one valley per grid line (ROUGHNESS_RULE)."""
    tv = least = 0.0
    for line in list(z) + list(z.T):
        line = line[np.isfinite(line)]
        if len(line) < 2:
            continue
        tv += float(np.abs(np.diff(line)).sum())
        least += float((line[0] - line.min()) + (line[-1] - line.min()))
    return {"total_variation": tv, "roughness": (tv / least - 1.0) if least > 0 else 0.0}


def sharpness(xs: np.ndarray, ys: np.ndarray, z: np.ndarray) -> dict[str, float]:
    """Second differences and ε-sharpness at the centre grid point (SHARPNESS_RULE)."""
    ci, cj = len(xs) // 2, len(ys) // 2
    l0 = float(z[cj, ci])
    out = {"loss_centre": l0}
    if len(xs) >= 3 and len(ys) >= 3:
        hx, hy = float(xs[ci + 1] - xs[ci]), float(ys[cj + 1] - ys[cj])
        out["curvature_x"] = float((z[cj, ci + 1] + z[cj, ci - 1] - 2 * l0) / hx ** 2)
        out["curvature_y"] = float((z[cj + 1, ci] + z[cj - 1, ci] - 2 * l0) / hy ** 2)
        ring = z[cj - 1:cj + 2, ci - 1:ci + 2]
        out["eps_sharpness"] = float(100 * (np.nanmax(ring) - l0) / (1 + l0))
    return out


# -- the probe ------------------------------------------------------------------------------------------
def _weights(model: RunnableModel, like: RunnableModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().to(like.device, like.dtype) for n, p in model.params.items()}


def landscape(models: Sequence[Any] | Any, data: Any = None, *, directions: str = "random", grid: int = 25,
              span: float = 1.0, points: int = 21, extend: float = 0.0, pad: float = 0.2, seed: int = 0,
              points_per_forward: int | None = None, device: str | None = "cpu", dtype: str | None = None,
              seq_len: int | None = None, batches: int = 4, batch_size: int = 8, data_seed: int = 0,
              text_field: str | None = None, loss_fn: Callable | None = None, store: Any = None, cache: bool = True,
              map_fn: Callable = map, progress: Progress | None = None, hessian_tol: float = 1e-4) -> LandscapeResult:
    """The loss landscape of one checkpoint (2-D, ``directions`` random or hessian), between two
    (1-D interpolation) or on the plane through three. ``models``: paths, hub ids, modules or
    RunnableModels. ``data``: as :func:`probes.load_data` (None: the default text). ``hessian_tol``:
    the Lanczos stopping tolerance of the Hessian directions (part of their store key)."""
    from ..config import Config
    from ..store import Store
    from .data import load_data
    from .model import load_model

    started = time.perf_counter()
    if not isinstance(models, (list, tuple)):
        models = [models]
    if not 1 <= len(models) <= 3:
        raise LayerscopeError(f"landscape takes one, two or three checkpoints, got {len(models)}")
    if directions not in ("random", "hessian"):
        raise LayerscopeError(f"--directions: expected random or hessian, got {directions!r}")
    if len(models) == 1 and (not isinstance(grid, int) or grid < 3 or grid % 2 == 0):
        raise LayerscopeError(f"--grid must be an odd integer >= 3 (the checkpoint is the centre point), got {grid!r}")
    if len(models) == 3 and (not isinstance(grid, int) or grid < 2):
        raise LayerscopeError(f"--grid must be an integer >= 2, got {grid!r}")
    if not span > 0:
        raise LayerscopeError(f"--span must be > 0, got {span}")
    if len(models) == 2 and (not isinstance(points, int) or points < 2):
        raise LayerscopeError(f"--points must be an integer >= 2, got {points!r}")
    if extend < 0:
        raise LayerscopeError(f"--extend must be >= 0, got {extend}")
    loaded = [load_model(m, device=device, dtype=dtype, loss_fn=loss_fn) for m in models]
    check_same_parameters(loaded, "cannot put on one landscape")
    base = loaded[0]
    probe_data: ProbeData = load_data(base, data, text_field=text_field, seq_len=seq_len, batches=batches,
                                      batch_size=batch_size, seed=data_seed)
    objective = Objective(base, probe_data)
    origin = _weights(base, base)
    marks: dict[str, tuple[float, float]] = {}
    hashes = [m.weights_hash for m in loaded]
    extra: dict[str, Any] = {}
    if len(models) == 2:
        kind = "interpolation"
        end = _weights(loaded[1], base)
        family = Family(origin, [{n: end[n] - origin[n] for n in origin}], "interpolation", ("alpha",))
        step = 1.0 / (points - 1)
        n_ext = int(math.floor(extend / step + 1e-9))
        coords = [((i * step),) for i in range(-n_ext, points + n_ext)]
        coords = [(round(c[0], 12),) for c in coords]
    elif len(models) == 3:
        kind = "plane"
        t2, t3 = _weights(loaded[1], base), _weights(loaded[2], base)
        u = {n: t2[n] - origin[n] for n in origin}
        w = {n: t3[n] - origin[n] for n in origin}
        uu = sum(float(t.double().pow(2).sum()) for t in u.values())
        if uu == 0:
            raise LayerscopeError("the first two checkpoints are identical: no plane through them")
        uw = sum(float((u[n].double() * w[n].double()).sum()) for n in u)
        v = {n: w[n] - (uw / uu) * u[n] for n in u}
        vv = sum(float(t.double().pow(2).sum()) for t in v.values())
        if vv <= 1e-12 * uu:
            raise LayerscopeError("the three checkpoints lie on one line: no plane through them (use two for 1-D)")
        scale = math.sqrt(uu / vv)
        v = {n: t * scale for n, t in v.items()}
        x3, y3 = uw / uu, math.sqrt(vv / uu)
        marks = {loaded[0].label: (0.0, 0.0), loaded[1].label: (1.0, 0.0), loaded[2].label: (x3, y3)}
        family = Family(origin, [u, v], "plane")
        lo_x, hi_x, lo_y, hi_y = min(0.0, x3), max(1.0, x3), 0.0, y3
        px, py = pad * (hi_x - lo_x), pad * (hi_y - lo_y)
        xs = np.linspace(lo_x - px, hi_x + px, grid)
        ys = np.linspace(lo_y - py, hi_y + py, grid)
        coords = [(float(x), float(y)) for y in ys for x in xs]
    else:
        kind = directions
        if directions == "random":
            dirs = random_directions(base, 2, seed)
            family = Family(origin, dirs, f"random:filter-normalised:seed={seed}")
        else:
            values, vecs = hessian_directions(objective, 2, seed=seed, tol=hessian_tol)
            norm = weight_norm(base)
            family = Family(origin, [{n: t * norm for n, t in v.items()} for v in vecs],
                            f"hessian-top2:seed={seed}:tol={hessian_tol!r}")
            extra["hessian_eigenvalues"] = [float(x) for x in values]
        xs = np.linspace(-span, span, grid)
        coords = [(float(x), float(y)) for y in xs for x in xs]
    key = _key(*hashes, probe_data.hash, family.spec)
    owned = store is None
    st = Store(Config().resolved_store()) if owned else (store if not isinstance(store, (str, Path)) else Store(store))
    try:
        ppf = points_per_forward or auto_points_per_forward(objective)
        evaluator = PointEvaluator(objective, family, ppf, calibrate=points_per_forward is None)
        results, cached = evaluate_points(evaluator, coords, key=key, store=st if cache else None,
                                          chunk=max(ppf, 1) if points_per_forward else 4 * ppf,
                                  map_fn=map_fn, progress=progress, label="grid points" if kind != "interpolation" else "points")
        if not cache:
            for t, r in results.items():
                st.put_artifact(key, KIND, t, r)
        result = _result(kind, family, coords, results, objective, loaded, probe_data, extend, grid, span, extra, marks,
                         evaluator.points_per_forward)
        result.seconds = time.perf_counter() - started
        result.computed, result.cached = len(coords) - cached, cached
        st.put_artifact(base.weights_hash, "landscape.summary", key, result.to_dict())  # the report finds it here
    finally:
        if owned or isinstance(store, (str, Path)):
            st.close()
    return result


def _result(kind, family, coords, results, objective, loaded, probe_data, extend, grid, span, extra, marks, ppf):
    columns = family.labels
    table = _frame(results, coords, objective, columns)
    if kind == "interpolation":
        summary = barrier(table, objective.counts)
        summary["extend"] = extend
    else:
        res = LandscapeResult(kind, table, {}, [], "")
        xs_, ys_, z = res.grid()
        summary = {**roughness(z), "roughness_rule": ROUGHNESS_RULE}
        if kind != "plane":
            summary.update(sharpness(xs_, ys_, z))
            summary["sharpness_rule"] = SHARPNESS_RULE
            summary["span"] = span
        summary["grid"] = grid
        summary["min_loss"] = float(np.nanmin(z))
        summary["max_loss"] = float(np.nanmax(z))
    summary.update(extra)
    summary["directions"] = family.spec
    summary["points_per_forward"] = ppf
    return LandscapeResult(kind, table, summary, [m.label for m in loaded], probe_data.description, marks=marks)


def print_landscape(result: LandscapeResult, console: Any = None) -> None:
    """Console view: what was evaluated and the summary numbers with their rules."""
    from rich.console import Console
    from rich.markup import escape

    from ..views import _fmt

    console = console or Console()
    s = result.summary
    n = len(result.table)
    console.print(escape(f"{result.kind} landscape of {', '.join(result.labels)} on {result.data_description}: "
                         f"{n} points ({result.computed} computed, {result.cached} from the store) in {result.seconds:.1f} s, "
                         f"{s.get('points_per_forward', 1)} points per forward"))
    if result.kind == "interpolation":
        verdict = "a barrier" if s["has_barrier"] else "no barrier: linearly connected on this data"
        console.print(f"L(0) = {s['loss_start']:.4f}, L(1) = {s['loss_end']:.4f}, max L = {s['max_loss']:.4f}")
        console.print(f"[bold]barrier[/bold] {_fmt(s['barrier'])} ± {_fmt(s['barrier_se'])} at α = {s['barrier_alpha']:.3g} "
                      f"(threshold {_fmt(s['barrier_threshold'])}): {verdict}")
        console.print(escape(f"rule: {s['rule']}"))
        return
    console.print(f"loss from {s['min_loss']:.4f} to {s['max_loss']:.4f}; roughness {_fmt(s['roughness'])} "
                  f"(total variation {_fmt(s['total_variation'])})")
    if "loss_centre" in s:
        console.print(f"centre: loss {s['loss_centre']:.4f}, curvature x {_fmt(s.get('curvature_x'))}, "
                      f"y {_fmt(s.get('curvature_y'))}, ε-sharpness {_fmt(s.get('eps_sharpness'))}%")
    if "hessian_eigenvalues" in s:
        console.print(f"Hessian top-2 eigenvalues: {', '.join(f'{v:.5g}' for v in s['hessian_eigenvalues'])}")
    for key in ("roughness_rule", "sharpness_rule"):
        if key in s:
            console.print(escape(f"{key.split('_')[0]}: {s[key]}"), style="dim")
    for label, (x, y) in result.marks.items():
        console.print(escape(f"  {label} at ({x:.3g}, {y:.3g})"))


def stored_landscapes(weights_hash: str, store: Any) -> list[LandscapeResult]:
    """Every landscape computed with this checkpoint first (for the report)."""
    import pandas as pd

    out = []
    for payload in store.artifacts(weights_hash, "landscape.summary"):
        table = pd.DataFrame(payload["points"])
        table["batch_losses"] = [[] for _ in range(len(table))]
        out.append(LandscapeResult(payload["kind"], table, payload["summary"], payload["models"], payload["data"],
                                   marks={k: tuple(v) for k, v in payload.get("marks", {}).items()}))
    return out
