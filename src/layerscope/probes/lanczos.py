"""Lanczos with full reorthogonalisation: extreme eigenvalues and spectral density of an operator.

Why not power iteration (PyHessian's): it converges at the rate λ₂/λ₁, so a near-degenerate top pair
takes hundreds of products and deflation stacks the errors of earlier eigenvalues onto later ones.
Lanczos builds a Krylov basis once; every Ritz value of its tridiagonal matrix T_m improves at every
step, the top-k and the bottom come from the same run, and each has a computable residual.

Full reorthogonalisation (classical Gram–Schmidt, twice) keeps the basis orthogonal to working
precision, so no spurious copies of converged eigenvalues appear and the residual formula holds.

**Stopping rule** (:func:`extreme_eigenpairs`): stop at the first step m where every requested Ritz
pair (the k largest and, if asked, the smallest) has Ritz residual ``‖H y − θ y‖ = |β_m s_{m,i}|`` at
most ``tol × max_i |θ_i|``, or when the Krylov space is exhausted (β_m ≈ 0: then the Ritz values are
exact), or at ``max_iter`` (then ``converged`` is False). For a symmetric H a true eigenvalue lies
within the residual of each Ritz value, so the reported residual bounds the error (and in practice
the error is about residual² / gap).

**Density** (:func:`slq`): stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; Ghorbani et al.
2019). From a Rademacher start vector v/√n, m Lanczos steps give nodes θ_j (eigenvalues of T_m) and
weights τ_j² (squared first components of its eigenvectors): the Gauss quadrature of vᵀ f(H) v / n.
Averaging over runs estimates the spectral measure (1/n) Σ δ(λ_i); its CDF is a step function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch


@dataclass
class LanczosRun:
    alpha: list[float] = field(default_factory=list)
    beta: list[float] = field(default_factory=list)  # beta[j] couples q_j and q_{j+1}
    storage: torch.Tensor | None = None  # (max steps, n), preallocated once: no copy of the basis per step
    exhausted: bool = False

    @property
    def basis(self) -> torch.Tensor:
        """The Lanczos vectors so far, as rows."""
        return self.storage[: len(self.alpha)]


def _orthogonalise(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    for _ in range(2):  # classical Gram-Schmidt twice is enough (Kahan/Parlett "twice is enough")
        w = w - q.T @ (q @ w)
    return w


def basis_device(n: int, steps: int, dtype: torch.dtype, device: torch.device | str) -> torch.device:
    """Where the Krylov basis (steps × n numbers) lives: on the device when it fits in half of the free
    device memory, else on the host (the orthogonalisation then runs there too)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    need = steps * n * torch.empty((), dtype=dtype).element_size()
    return device if need < free // 2 else torch.device("cpu")


def lanczos_steps(matvec: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, max_iter: int,
                  after_step: Callable[[LanczosRun], bool] | None = None, keep_basis_on: torch.device | None = None) -> LanczosRun:
    """Run Lanczos from ``v0`` until ``after_step(run)`` returns True, the space is exhausted or max_iter."""
    run = LanczosRun()
    store = keep_basis_on or v0.device
    q = v0 / torch.linalg.vector_norm(v0)
    n = v0.numel()
    run.storage = torch.empty(min(max_iter, n), n, dtype=v0.dtype, device=store)
    for j in range(min(max_iter, n)):
        run.storage[j] = q.to(store)
        w = matvec(q)
        a = float(torch.dot(w, q))
        run.alpha.append(a)
        w = _orthogonalise(w.to(store), run.basis).to(q.device)
        b = float(torch.linalg.vector_norm(w))
        scale = max(abs(a), max((abs(x) for x in run.alpha), default=0.0), 1e-300)
        if b <= 1e-10 * scale or j == n - 1:
            run.beta.append(0.0)
            run.exhausted = True
            if after_step:
                after_step(run)
            break
        run.beta.append(b)
        if after_step and after_step(run):
            break
        q = w / b
    return run


def ritz(run: LanczosRun) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of the tridiagonal T_m (float64): values ascending, vectors in columns."""
    from scipy.linalg import eigh_tridiagonal

    a = np.asarray(run.alpha, dtype=np.float64)
    if len(a) == 1:
        return a.copy(), np.ones((1, 1))
    off = np.asarray(run.beta[: len(a) - 1], dtype=np.float64)
    return eigh_tridiagonal(a, off)


@dataclass
class EigenResult:
    """Ritz pairs at the stop: ``top`` (largest first) and ``bottom`` (smallest), each with residuals."""

    top: np.ndarray
    top_residuals: np.ndarray
    bottom: float | None
    bottom_residual: float | None
    iterations: int
    converged: bool
    exhausted: bool
    vectors: torch.Tensor | None = None  # (k, n) top Ritz vectors when asked for


def extreme_eigenpairs(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, k: int, *, bottom: bool = True,
                       tol: float = 1e-4, max_iter: int = 100, seed: int = 0, dtype: torch.dtype = torch.float64,
                       device: torch.device | str = "cpu", vectors: bool = False,
                       on_step: Callable[[int, bool], None] | None = None) -> EigenResult:
    """The k largest eigenvalues (and the smallest) of a symmetric operator by the stopping rule above."""
    k = min(k, n)
    gen = torch.Generator().manual_seed(seed)
    v0 = torch.randn(n, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    state: dict = {}

    def check(run: LanczosRun) -> bool:
        m = len(run.alpha)
        done = False
        if m >= min(k + (1 if bottom else 0), n) or run.exhausted:
            vals, vecs = ritz(run)
            res = np.abs(run.beta[m - 1] * vecs[-1, :])
            order = np.argsort(vals)[::-1]
            scale = max(np.abs(vals).max(), 1e-300)
            want = list(order[:k]) + ([int(np.argmin(vals))] if bottom else [])
            done = run.exhausted or bool(np.all(res[want] <= tol * scale))
            state.update(vals=vals, vecs=vecs, res=res, order=order)
        if on_step:
            on_step(m, done)
        return done

    run = lanczos_steps(matvec, v0, max_iter, check, keep_basis_on=basis_device(n, max_iter, dtype, device))
    vals, vecs, res, order = state["vals"], state["vecs"], state["res"], state["order"]
    top_idx = order[:k]
    scale = max(np.abs(vals).max(), 1e-300)
    bi = int(np.argmin(vals))
    want = list(top_idx) + ([bi] if bottom else [])
    out = EigenResult(top=vals[top_idx].copy(), top_residuals=res[top_idx].copy(),
                      bottom=float(vals[bi]) if bottom else None, bottom_residual=float(res[bi]) if bottom else None,
                      iterations=len(run.alpha), converged=run.exhausted or bool(np.all(res[want] <= tol * scale)),
                      exhausted=run.exhausted)
    if vectors:
        q = run.basis  # (m, n)
        s = torch.from_numpy(vecs[:, top_idx].T.copy()).to(device=q.device, dtype=q.dtype)
        out.vectors = (s @ q).to(device)
    return out


@dataclass
class Density:
    """SLQ: per run, nodes (Ritz values) and weights (summing to 1)."""

    nodes: list[np.ndarray]
    weights: list[np.ndarray]
    steps: int

    def cdf(self, x: np.ndarray) -> np.ndarray:
        """Estimated share of eigenvalues ≤ x (averaged over runs)."""
        x = np.asarray(x, dtype=np.float64)
        return np.mean([(w[None, :] * (t[None, :] <= x[:, None])).sum(axis=1) for t, w in zip(self.nodes, self.weights)],
                       axis=0)

    def smoothed(self, grid: np.ndarray, sigma: float) -> np.ndarray:
        """The density convolved with a Gaussian of width sigma (what is plotted)."""
        grid = np.asarray(grid, dtype=np.float64)
        out = np.zeros_like(grid)
        for t, w in zip(self.nodes, self.weights):
            out += (w[None, :] * np.exp(-0.5 * ((grid[:, None] - t[None, :]) / sigma) ** 2)).sum(axis=1)
        return out / (len(self.nodes) * sigma * np.sqrt(2 * np.pi))

    def to_dict(self) -> dict:
        return {"steps": self.steps, "nodes": [t.tolist() for t in self.nodes], "weights": [w.tolist() for w in self.weights]}

    @classmethod
    def from_dict(cls, d: dict) -> "Density":
        return cls([np.asarray(t) for t in d["nodes"]], [np.asarray(w) for w in d["weights"]], int(d["steps"]))


def slq(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, *, runs: int = 4, steps: int = 40, seed: int = 0,
        dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
        on_step: Callable[[], None] | None = None) -> Density:
    """Stochastic Lanczos quadrature with Rademacher start vectors (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    for _ in range(runs):
        v = (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(device=device, dtype=dtype)

        def tick(run: LanczosRun) -> bool:
            if on_step:
                on_step()
            return False

        run = lanczos_steps(matvec, v, steps, tick, keep_basis_on=basis_device(n, steps, dtype, device))
        vals, vecs = ritz(run)
        w = vecs[0, :] ** 2
        nodes.append(vals)
        weights.append(w / w.sum())
    return Density(nodes, weights, steps)
