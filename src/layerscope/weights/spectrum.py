"""Singular values of a matrix, computed once and shared by every spectral metric.

Route: the eigenvalues of the smaller Gram matrix (``eigvalsh``), several times cheaper than
``svdvals`` on a CPU. The Gram matrix squares the condition number, so in the default float64
mode it is accumulated in float64 (in row blocks, so the float64 copy never exceeds a block), and
a matrix whose condition number exceeds ``GRAM_MAX_CONDITION`` — where even float64 Gram
eigenvalues lose the smallest singular value — gets σ_min recomputed from a QR of the matrix
(up to κ = 1e6), or is re-solved with a float64 SVD of the matrix itself (beyond, and whenever it
may be rank deficient, so the numerical rank stays exact).
``float32`` mode is the plain fast route, accurate for the large singular values only.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

log = logging.getLogger("layerscope")

#: Above this κ the float64 Gram route's σ_min error (~ sqrt(m)·eps64·κ²) may exceed 1e-6 relative.
GRAM_MAX_CONDITION = 1e4
#: Up to this κ (as estimated by the Gram route) σ_min alone is refined; beyond it, a full float64 SVD.
REFINE_MAX_CONDITION = 1e6
BLOCK_BYTES = 64 << 20  # float64 bytes per row block of the Gram accumulation

_fallback_warned = threading.Event()
_warm_lock = threading.Lock()
_warm_devices: set[str] = set()


def _warm_up(dev: torch.device) -> None:
    """Initialise the CUDA linear-algebra backends once, from one thread.

    Their lazy initialisation is not thread-safe ("lazy wrapper should be called at most once"
    when two workers hit ``eigvalsh`` first at the same time).
    """
    with _warm_lock:
        if str(dev) in _warm_devices:
            return
        x = torch.eye(4, dtype=torch.float64, device=dev)
        torch.linalg.eigvalsh(x)
        torch.linalg.svdvals(x)
        torch.linalg.eigvalsh(x.float())
        _warm_devices.add(str(dev))


@dataclass
class Spectrum:
    """Singular values (descending, float64) of an m × n matrix, plus the quantities metrics share."""

    sv: np.ndarray
    shape: tuple[int, int]
    method: str

    @cached_property
    def evals(self) -> np.ndarray:
        """Eigenvalues of WᵀW (σ²), ascending — WeightWatcher's ESD."""
        return np.sort(self.sv.astype(np.float64) ** 2)

    @cached_property
    def energy(self) -> float:
        return float(np.sum(self.sv.astype(np.float64) ** 2))

    def powerlaw(self, thresh: float):
        """The WeightWatcher-style power-law fit of the ESD, memoised per threshold."""
        from .metrics.powerlaw import fit_powerlaw

        fits = self.__dict__.setdefault("_fits", {})
        if thresh not in fits:
            fits[thresh] = fit_powerlaw(self.evals, thresh)
        return fits[thresh]

    def mp(self):
        """The Marchenko–Pastur null fitted to this spectrum (see ``metrics.mp``), memoised."""
        if "_mp" not in self.__dict__:
            from .metrics.mp import fit_mp

            self.__dict__["_mp"] = fit_mp(self.evals, self.shape)
        return self.__dict__["_mp"]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        if not _fallback_warned.is_set():
            _fallback_warned.set()
            log.warning("CUDA requested but not available: computing on the CPU")
        return torch.device("cpu")
    return torch.device(device)


def _gram(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """WᵀW over the long axis (W is tall here), accumulated in row blocks of ``dtype``."""
    if w.device.type == "cpu" and dtype == torch.float64:
        return _gram_cpu64(w)
    m, n = w.shape
    rows = max(1, BLOCK_BYTES // (n * torch.finfo(dtype).bits // 8))
    if w.dtype == dtype and rows >= m:
        return w.T @ w
    g = torch.zeros((n, n), dtype=dtype, device=w.device)
    for start in range(0, m, rows):
        block = w[start:start + rows].to(dtype)
        g.addmm_(block.T, block)
    return g


def _gram_cpu64(w: torch.Tensor) -> torch.Tensor:
    """Float64 WᵀW on the CPU through NumPy, whose ``b.T @ b`` is a BLAS ``syrk``.

    syrk does half the flops of the general product torch would run, which makes the float64
    Gram cost about what a float32 ``gemm`` costs.
    """
    wn = w.numpy()
    m, n = wn.shape
    rows = max(1, BLOCK_BYTES // (n * 8))
    if wn.dtype == np.float64 and wn.flags.c_contiguous and rows >= m:
        return torch.from_numpy(wn.T @ wn)
    g = np.zeros((n, n), dtype=np.float64)
    for start in range(0, m, rows):
        block = np.ascontiguousarray(wn[start:start + rows], dtype=np.float64)
        g += block.T @ block
    return torch.from_numpy(g)


def _singular_values_on(w: torch.Tensor, precision: str) -> tuple[np.ndarray, str]:
    if w.shape[0] < w.shape[1]:
        w = w.T  # Gram on the smaller side; singular values are the same
    if precision == "float32":
        lam = torch.linalg.eigvalsh(_gram(w, torch.float32))
        sv = torch.sqrt(torch.clamp(lam.double(), min=0.0)).flip(0)
        return sv.cpu().numpy(), "gram32"
    lam = torch.linalg.eigvalsh(_gram(w, torch.float64))
    lam_max, lam_min = float(lam[-1]), float(lam[0])
    sv = torch.sqrt(torch.clamp(lam, min=0.0)).flip(0)
    if lam_max > 0 and lam_min > lam_max / GRAM_MAX_CONDITION**2:
        return sv.cpu().numpy(), "gram64"
    if lam_max > 0 and lam_min > lam_max / REFINE_MAX_CONDITION**2:
        # κ in (1e4, 1e6]: only σ_min lost digits to the squaring (the others' absolute errors are
        # ~1e-15·σ_max, invisible in every metric); recover it from the matrix itself
        smallest = _smallest_singular_value(w)
        if smallest is not None:
            sv[-1] = smallest
            return sv.cpu().numpy(), "gram64+refined"
    # rank-deficient or extremely ill-conditioned: every small singular value matters (numerical rank)
    return torch.linalg.svdvals(w.to(torch.float64)).cpu().numpy(), "svd64"


def _smallest_singular_value(w: torch.Tensor, block: int = 4, max_iter: int = 200) -> float | None:
    """σ_min of a tall W without squaring κ: R of a blocked (TSQR) QR, then subspace inverse iteration.

    The QR is backward stable, so σ_min(R) carries relative error ~eps64·κ; the float64 copy never
    exceeds one row block. Ritz values approach σ_min from above; None if the iteration breaks down.
    """
    m, n = w.shape
    rows = max(n, BLOCK_BYTES // (n * 8))
    r = torch.zeros((0, n), dtype=torch.float64, device=w.device)
    for start in range(0, m, rows):
        r = torch.linalg.qr(torch.cat([r, w[start:start + rows].to(torch.float64)]), mode="r").R
    k = min(block, n)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64).to(w.device)).Q
    previous = float("inf")
    for _ in range(max_iter):
        y = torch.linalg.solve_triangular(r.T, x, upper=False)
        z = torch.linalg.solve_triangular(r, y, upper=True)  # (RᵀR)⁻¹ x
        if not bool(torch.isfinite(z).all()):
            return None
        x = torch.linalg.qr(z).Q
        smallest = float(torch.linalg.svdvals(r @ x)[-1])
        if abs(previous - smallest) <= 1e-14 * smallest:
            return smallest
        previous = smallest
    return None


def singular_values(matrix: torch.Tensor, precision: str = "float64", device: str = "cpu") -> tuple[np.ndarray, str]:
    """σ of a 2-D floating tensor, descending. CUDA out-of-memory falls back to the CPU."""
    dev = resolve_device(device)
    w = matrix.detach()
    if not w.dtype.is_floating_point or w.dtype in (torch.float16, torch.bfloat16) or w.dtype.itemsize == 1:
        w = w.to(torch.float32)
    if dev.type == "cuda":
        try:
            _warm_up(dev)
            return _singular_values_on(w.to(dev, non_blocking=False), precision)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            if not isinstance(exc, torch.cuda.OutOfMemoryError) and "out of memory" not in str(exc).lower():
                raise
            torch.cuda.empty_cache()
            log.warning("CUDA out of memory on a %s matrix: computing it on the CPU", "×".join(map(str, w.shape)))
    return _singular_values_on(w, precision)
