"""Singular values of a matrix, computed once and shared by every spectral metric.

Route: the eigenvalues of the smaller Gram matrix (``eigvalsh``), several times cheaper than
``svdvals`` on a CPU. The Gram matrix squares the condition number, so in the default float64
mode it is accumulated in float64 (in row blocks, so the float64 copy never exceeds a block), and
a matrix whose condition number exceeds ``GRAM_MAX_CONDITION`` — where even float64 Gram
eigenvalues lose the smallest singular value — gets σ_min recomputed from a QR of the matrix
(up to κ = 1e6), or is re-solved with a float64 SVD of the matrix itself (beyond, and whenever it
may be rank deficient, so the numerical rank stays exact).
``float32`` mode is the plain fast route, accurate for the large singular values only.

Why float64 throughout, although the float32 "floor" (float32 Gram + float32 ``eigvalsh``) is
1.3–1.6× faster (issue 16; ``bench/bench_precision.py`` measures all of this on bench_analyze's
checkpoint, u = 2⁻²⁴):

- The float32 eigensolver (MKL ``ssyevd``) is the larger error: 236 u·λ_max at n = 2048 (the
  float32 Gram alone: 0.5–7 u·λ_max). On that checkpoint's random-init matrices it moves mp_ks by
  up to 2.3e-4 and alpha by up to 1.6e-4 relative — the floor itself breaks the 1e-4 promise, so
  no certificate could accept a float32 eigensolver for those metrics.
- A float32 Gram with a float64 eigensolver is accurate in practice (every metric but the σ_min
  ones within 2e-5) but not *certifiably*: mp_ks of a random-like spectrum is ~1/M ≈ 2e-3, and
  even the exact ‖E‖₂ (3.5 u·λ_max on a 5504×2048 MLP matrix), applied as a uniform shift of every
  eigenvalue, moves it by 2.7e-5 — over half of the 5e-5 budget before the worst case over
  independent shifts, and before the safety factor an *estimated* ‖E‖₂ needs (the estimate below
  costs more float64 passes over W than the float32 Gram saves). The MP metrics register no
  certificate, so with the default metrics the mixed route below never certifies.
- What is left over the floor is the float64 ``eigvalsh`` (1.4–1.8× the float32 one), the
  float64 Gram (a ``syrk``: 1.0–1.3× the float32 ``gemm`` the floor runs on a quiet machine,
  up to 2.5× summed over a loaded run), and the content hash, moments and metrics that the floor
  does not compute at all (~4.4 s of a ~16 s single-threaded floor).

Mixed precision (float64 mode, for tall float32 matrices, when ``MIXED_ENABLED`` — off by default,
see there why — see ``_mixed_on``): the Gram
matrix, the largest cost beside the eigensolver, is formed in float32 (half the time of the
float64 ``syrk``), its rounding error ``E = fl32(WᵀW) − WᵀW`` is measured a posteriori in float64
by a randomised power iteration on ``E``, and ``eigvalsh`` runs in float64 on it. By Weyl,
``|λ̂_i − λ_i| ≤ ‖E‖₂ + n·eps64·‖G‖`` for every i, so each singular value carries the relative
bound ``rel_err_i = δ / (2 (λ̂_i − δ))``; the result is used only when the caller's certificate
accepts it: each metric bounds its own error from these (within 5e-5, half the 1e-4 promise) and
the discrete ones — numerical rank, energy ranks, the power-law fit's x_min — check that no
decision boundary lies within the bound. Otherwise the float64 route above runs. The eigensolver stays float64: float32 ``eigvalsh`` errors measured
here grow like n/8·eps32·‖G‖ (255·eps32·‖G‖ at n = 2048), so its stated bound p(n)·eps32·‖G‖
with p(n) = n (≈1.2e-4·λ_max at n = 2048) cannot certify the power-law fit or the entropy rank.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np
import torch

log = logging.getLogger("layerscope")

#: Above this κ the float64 Gram route's σ_min error (~ sqrt(m)·eps64·κ²) may exceed 1e-6 relative.
GRAM_MAX_CONDITION = 1e4
#: Up to this κ (as estimated by the Gram route) σ_min alone is refined; beyond it, a full float64 SVD.
REFINE_MAX_CONDITION = 1e6
BLOCK_BYTES = 64 << 20  # float64 bytes per row block of the Gram accumulation
#: Mixed precision is tried on matrices at least this tall (m >= ratio · n, after transposing) and
#: this wide: square matrices of trained or random models have κ ~ 1e3..1e5, where σ_min cannot
#: be certified from a float32 Gram, so they go straight to the float64 route (speed only).
MIXED_MIN_ASPECT = 2.0
MIXED_MIN_N = 128
#: Off by default: measured on bench_analyze's 308M checkpoint (2-core CPU), the error estimate
#: costs more than the float32 Gram saves (34 s vs 23 s float64 Gram on the 32000×2048 embedding,
#: single thread, loaded machine) and the power-law fit of random-init matrices cannot certify
#: (their KS distances are too flat near the minimum), so every matrix also took the float64
#: route: the whole run was 2× slower. On trained matrices the certificates pass more often
#: (7 of MiniLM's 13 tall matrices). Kept, tested, for an error estimate that costs less.
MIXED_ENABLED = False
#: Randomised estimate of ‖E‖₂: a block of ERR_BLOCK Gaussian vectors, ERR_ITERS power steps,
#: bound = ERR_SAFETY × estimate. For one vector, P(‖E‖ > θ·est) ≤ 0.8·θ^(-k/2)·√n (Dixon 1983,
#: k power steps); the block's maximum fails only if all vectors do: with θ = 5, k = 8, n = 2048,
#: ≈ (0.057)^4 ≈ 1e-5.
ERR_BLOCK, ERR_ITERS, ERR_SAFETY = 4, 8, 5.0

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
    #: per singular value (same order as ``sv``), a bound on |σ̂_i / σ_i − 1| against the float64
    #: answer; None for the float64 route itself
    rel_err: np.ndarray | None = None

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


#: Store method suffix of a mixed-precision spectrum; its array is the σ followed by their bounds.
MIXED_SUFFIX = "~mixed"


def spectrum_record(spec: Spectrum, precision: str) -> tuple[str, np.ndarray]:
    """(store method, array) of a spectrum: a mixed one keeps its bound as the array's last element,
    under its own method name, so a float64 reader never mistakes it for a float64 spectrum."""
    if spec.rel_err is not None:
        return precision + MIXED_SUFFIX, np.concatenate([np.asarray(spec.sv, dtype=np.float64), spec.rel_err])
    return precision, np.asarray(spec.sv, dtype=np.float64)


def stored_spectrum(store, content_hash: str, precision: str, shape: tuple[int, int]) -> Spectrum | None:
    """The stored spectrum of a matrix: float64 if there is one, else a mixed one with its bound."""
    sv = store.spectrum(content_hash, precision)
    if sv is not None:
        return Spectrum(sv, shape, "stored")
    packed = store.spectrum(content_hash, precision + MIXED_SUFFIX)
    if packed is not None and len(packed) >= 2 and len(packed) % 2 == 0:
        half = len(packed) // 2
        return Spectrum(packed[:half], shape, "stored", rel_err=packed[half:])
    return None


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
    """Float64 WᵀW on the CPU through NumPy, whose ``b.T @ b`` (or ``b @ b.T``) is a BLAS ``syrk``.

    syrk does half the flops of the general product torch would run, which makes the float64
    Gram cost about what a float32 ``gemm`` costs. A transposed view (the Gram of a wide matrix,
    e.g. an MLP down-projection) is accumulated from blocks of the original matrix's columns,
    ``b @ b.T``: converting row blocks of the view instead gathered every element with a stride
    of a whole row (issue 16: 0.74 s against 0.51 s for the same-sized tall matrix).
    """
    wn = w.numpy()
    m, n = wn.shape
    rows = max(1, BLOCK_BYTES // (n * 8))
    if wn.dtype == np.float64 and wn.flags.c_contiguous and rows >= m:
        return torch.from_numpy(wn.T @ wn)
    g = np.zeros((n, n), dtype=np.float64)
    if wn.flags.f_contiguous and not wn.flags.c_contiguous:  # wn = Aᵀ with A (n × m) C-contiguous
        a = wn.T
        for start in range(0, m, rows):
            block = np.ascontiguousarray(a[:, start:start + rows], dtype=np.float64)
            g += block @ block.T
        return torch.from_numpy(g)
    for start in range(0, m, rows):
        block = np.ascontiguousarray(wn[start:start + rows], dtype=np.float64)
        g += block.T @ block
    return torch.from_numpy(g)


def _singular_values_on(w: torch.Tensor, precision: str, certify=None) -> Spectrum:
    shape = (int(w.shape[0]), int(w.shape[1]))
    if w.shape[0] < w.shape[1]:
        w = w.T  # Gram on the smaller side; singular values are the same
    if precision == "float32":
        lam = torch.linalg.eigvalsh(_gram(w, torch.float32))
        sv = torch.sqrt(torch.clamp(lam.double(), min=0.0)).flip(0)
        return Spectrum(sv.cpu().numpy(), shape, "gram32")
    if certify is not None and _mixed_applies(w):
        spec = _mixed_on(w, shape)
        if spec is not None and certify(spec):
            return spec
    sv, method = _float64_on(w)
    return Spectrum(sv, shape, method)


def _mixed_applies(w: torch.Tensor) -> bool:
    m, n = w.shape
    return MIXED_ENABLED and w.dtype == torch.float32 and n >= MIXED_MIN_N and m >= MIXED_MIN_ASPECT * n


def _mixed_on(w: torch.Tensor, shape: tuple[int, int]) -> Spectrum | None:
    """Float32 Gram with its rounding error measured, float64 ``eigvalsh``; None if it breaks down."""
    m, n = w.shape
    g = _gram(w, torch.float32).to(torch.float64)
    lam = torch.linalg.eigvalsh(g)
    lam_max, lam_min = float(lam[-1]), float(lam[0])
    if not lam_max > 0:
        return None
    delta = _gram_error_bound(w, g) + n * np.finfo(np.float64).eps * lam_max
    if lam_min - delta <= 0:
        return None
    # |σ̂ − σ| / σ = |λ̂ − λ| / (σ̂σ + σ²) ≤ δ / (2 (λ̂_i − δ)) for each singular value
    lam_desc = lam.flip(0).cpu().numpy()
    sv = np.sqrt(np.clip(lam_desc, 0.0, None))
    return Spectrum(sv, shape, "gram32+bound", rel_err=delta / (2.0 * (lam_desc - delta)))


def _gram_error_bound(w: torch.Tensor, g: torch.Tensor) -> float:
    """ERR_SAFETY × a randomised power-iteration estimate of ‖G − WᵀW‖₂, both sides in float64.

    ``E x = G x − Wᵀ(W x)`` is applied without forming WᵀW in float64 (W is read in row blocks);
    the float64 matvecs' own rounding, ≈ √m·eps64·‖W‖_F², is added to the bound.
    """
    m, n = w.shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, ERR_BLOCK, generator=gen, dtype=torch.float64).to(w.device)
    x /= torch.linalg.vector_norm(x, dim=0)
    rows = max(1, BLOCK_BYTES // (n * 8))
    est = 0.0
    for _ in range(ERR_ITERS):
        y = g @ x
        for start in range(0, m, rows):
            block = w[start:start + rows].to(torch.float64)
            y -= block.T @ (block @ x)
        norms = torch.linalg.vector_norm(y, dim=0)
        est = max(est, float(norms.max()))
        if not est > 0:
            break
        x = y / norms.clamp_min(1e-300)
    energy = float(torch.trace(g))
    floor = 8.0 * math.sqrt(m) * np.finfo(np.float64).eps * energy
    return ERR_SAFETY * est + floor


def _float64_on(w: torch.Tensor) -> tuple[np.ndarray, str]:
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


def singular_values(matrix: torch.Tensor, precision: str = "float64", device: str = "cpu",
                    certify: Callable[[Spectrum], bool] | None = None) -> Spectrum:
    """σ of a 2-D floating tensor, descending. CUDA out-of-memory falls back to the CPU.

    ``certify``: in float64 mode, a predicate that accepts a mixed-precision spectrum (its
    ``rel_err`` bound) for the metrics the caller will compute; None means float64 throughout.
    """
    dev = resolve_device(device)
    w = matrix.detach()
    if not w.dtype.is_floating_point or w.dtype in (torch.float16, torch.bfloat16) or w.dtype.itemsize == 1:
        w = w.to(torch.float32)
    if dev.type == "cuda":
        try:
            _warm_up(dev)
            return _singular_values_on(w.to(dev, non_blocking=False), precision, certify)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            if not isinstance(exc, torch.cuda.OutOfMemoryError) and "out of memory" not in str(exc).lower():
                raise
            torch.cuda.empty_cache()
            log.warning("CUDA out of memory on a %s matrix: computing it on the CPU", "×".join(map(str, w.shape)))
    return _singular_values_on(w, precision, certify)
