"""Gradient health while training, at no extra forward or backward.

Training-thread side (:class:`GradientTracker`), all of it a few fused ``torch._foreach_*`` calls
over tensors that already exist, with no host synchronisation (results are copied to the host
asynchronously and read by the monitor's worker):

* at a snapshot step, the per-tensor gradient norms ‖g‖ as they are before ``zero_grad``
  (``Monitor.step`` when the loop calls it while gradients exist, or ``Monitor.observe_gradients``
  from a callback that runs before the optimizer step);
* the gradient noise scale when gradient accumulation gives two batch sizes for free: after each
  micro-batch's backward, ``Monitor.observe_micro_batch(batch_size)`` takes the increment of the
  accumulated gradient (one extra gradient-sized buffer holds the previous sum); at the next step
  the accumulated gradient is the big batch. Or, for DDP (per-rank vs all-reduced gradient) or
  anything else that knows both norms, ``Monitor.observe_batch_sizes(...)``.

Whatever scale the loop gives its loss (divided by the accumulation steps or not) multiplies both
squared norms alike, so B_simple = S / |G|² does not depend on it; |G|² and S are reported in the
units of the accumulated gradient. S and |G|² are averaged over the steps between two records and
only then divided (McCandlish et al. 2018, appendix A: the ratio of averages, not the average of
ratios).

Worker side (:func:`gradient_columns`): per matrix ``grad_norm``, ``grad_to_weight`` and — from a
second copy of the weights taken at the step after a snapshot — ``update_ratio`` = ‖θ_{s+1} − θ_s‖ /
‖θ_s‖, the size of one optimizer update (rule of thumb: about 1e-3; far below, that tensor barely
learns; far above, the step size is unstable). Per layer and total: ``grad/norm/...`` in the summary.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

UPDATE_RULE_OF_THUMB = 1e-3


def _async_host(values: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """``values`` on the host without blocking the training thread on CUDA (pinned + event)."""
    if values.is_cuda:
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event
    return values.clone(), None


def _sq_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    norms = torch._foreach_norm([t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors])
    return torch.stack(norms).to(torch.float64) ** 2


class GradientTracker:
    """Gradient norms and micro-batch noise-scale statistics of ``params`` (name -> Parameter)."""

    def __init__(self, params: dict[str, torch.Tensor]):
        self.names = list(params)
        self.params = [params[n] for n in self.names]
        self._prev: list[torch.Tensor] | None = None  # accumulated gradient after the last micro-batch
        self._buffers: list[torch.Tensor] | None = None
        self._micro_sq: torch.Tensor | None = None  # Σ_k ‖x_k‖² per tensor, this step
        self._micro_n = 0
        self._micro_batch = 0
        # averaged over steps until the next record: mean ‖G_small‖², ‖G_big‖², their batch sizes
        self._small: torch.Tensor | None = None
        self._big: torch.Tensor | None = None
        self._steps = 0
        self._sizes: tuple[float, float] | None = None
        self._explicit: list[tuple[float, float, float, float]] = []
        self.pending: tuple[int, tuple[torch.Tensor, Any]] | None = None

    # -- gradient norms -----------------------------------------------------------------------
    def grad_sq_norms(self) -> tuple[torch.Tensor, Any] | None:
        """Per-tensor ‖g‖² as they are now (0 for tensors without a gradient), on the host
        asynchronously; None when no tensor has a gradient."""
        grads = [p.grad for p in self.params]
        present = [g for g in grads if g is not None]
        if not present:
            if self._prev is not None:  # the loop zeroes before step(): the last accumulated sum
                return _async_host(_sq_norms(self._prev))
            return None
        sq = _sq_norms(present)
        if len(present) != len(grads):
            full = torch.zeros(len(grads), dtype=sq.dtype, device=sq.device)
            full[torch.tensor([i for i, g in enumerate(grads) if g is not None], device=sq.device)] = sq
            sq = full
        return _async_host(sq)

    # -- noise scale from micro-batches -------------------------------------------------------
    def observe_micro_batch(self, batch_size: int) -> None:
        """After a micro-batch's backward: the increment of the accumulated gradient."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        with torch.no_grad():
            if self._prev is None:
                sq = _sq_norms(grads)
                if self._buffers is None or any(b.shape != g.shape or b.dtype != g.dtype for b, g in zip(self._buffers, grads)):
                    self._buffers = [g.detach().clone() for g in grads]  # allocated once, reused every step
                else:
                    torch._foreach_copy_(self._buffers, grads)
                self._prev = self._buffers
            else:
                torch._foreach_sub_(self._prev, grads)  # in place: prev − now = −increment, no allocation
                sq = _sq_norms(self._prev)
                torch._foreach_copy_(self._prev, grads)
        self._micro_sq = sq if self._micro_sq is None else self._micro_sq + sq
        self._micro_n += 1
        self._micro_batch = int(batch_size)

    def end_step(self) -> None:
        """At the optimizer step: the accumulated gradient is the big batch (K micro-batches)."""
        if self._prev is None:
            return
        k = self._micro_n
        if k >= 2:
            with torch.no_grad():
                big = _sq_norms(self._prev) / (k * k)  # ‖mean of the increments‖²
            small = self._micro_sq / k
            self._small = small if self._small is None else self._small + small
            self._big = big if self._big is None else self._big + big
            self._steps += 1
            self._sizes = (float(self._micro_batch), float(self._micro_batch * k))
        self._prev, self._micro_sq, self._micro_n = None, None, 0

    def observe_batch_sizes(self, small_sq_norm: float, small_batch: float, big_sq_norm: float, big_batch: float) -> None:
        self._explicit.append((float(small_sq_norm), float(small_batch), float(big_sq_norm), float(big_batch)))

    def take_noise(self) -> dict[str, Any] | None:
        """The noise statistics gathered since the last call (host copies started), and reset."""
        out: dict[str, Any] = {}
        if self._steps:
            out["per_tensor"] = (_async_host(self._small / self._steps), _async_host(self._big / self._steps),
                                 self._sizes, self._steps)
        if self._explicit:
            out["explicit"] = list(self._explicit)
        self._small = self._big = None
        self._steps = 0
        self._explicit = []
        return out or None


def noise_scale(small: float, big: float, b_small: float, b_big: float) -> tuple[float, float, float]:
    """(|G|², S, B_simple) from mean ‖G_small‖² and ‖G_big‖² (McCandlish et al. 2018, appendix A)."""
    g2 = (b_big * big - b_small * small) / (b_big - b_small)
    s = (small - big) / (1 / b_small - 1 / b_big)
    return g2, s, (s / g2 if g2 > 0 else math.nan)


def _host(pair: tuple[torch.Tensor, Any]) -> np.ndarray:
    values, event = pair
    if event is not None:
        event.synchronize()
    return values.numpy()


def gradient_columns(table, tensors: dict[str, torch.Tensor], extra: dict[str, Any], names: list[str],
                     summary: dict[str, float]) -> None:
    """Add grad_norm, grad_to_weight, update_ratio to the per-matrix ``table`` and per-layer and
    total gradient numbers and the noise scale to ``summary`` (in place)."""
    from ..anatomy.core import layer_of
    from ..sources.base import normalise_name

    by_name = {normalise_name(n): i for i, n in enumerate(names)}
    sq = _host(extra["grad_sq"]) if "grad_sq" in extra else None
    if sq is not None:
        summary["grad/norm"] = float(math.sqrt(sq.sum()))
        layers: dict[int, float] = {}
        for n, i in by_name.items():
            layer = layer_of(n)
            if layer is not None:
                layers[layer] = layers.get(layer, 0.0) + float(sq[i])
        for layer, v in sorted(layers.items()):
            summary[f"grad/norm/layer_{layer}"] = math.sqrt(v)
        gn, ratio = [], []
        for name in table["name"]:
            i = by_name.get(name)
            if i is None or name not in tensors:
                gn.append(math.nan)
                ratio.append(math.nan)
                continue
            g = math.sqrt(float(sq[i]))
            w = float(tensors[name].double().norm())
            gn.append(g)
            ratio.append(g / w if w > 0 else math.nan)
        table["grad_norm"] = gn
        table["grad_to_weight"] = ratio
        if any(math.isfinite(r) for r in ratio):
            summary["grad/to_weight/median"] = float(np.nanmedian(ratio))
    after = extra.get("after")
    if after is not None:
        if extra.get("after_event") is not None:
            extra["after_event"].synchronize()
        ratios = []
        for name in table["name"]:
            if name in tensors and name in after and after[name].shape == tensors[name].shape:
                w = float(tensors[name].double().norm())
                d = float((after[name].double() - tensors[name].double()).norm())
                ratios.append(d / w if w > 0 else math.nan)
            else:
                ratios.append(math.nan)
        table["update_ratio"] = ratios
        finite = [r for r in ratios if math.isfinite(r)]
        if finite:
            summary["update/ratio/median"] = float(np.median(finite))
            summary["update/ratio/max"] = float(np.max(finite))
            summary["update/ratio/min"] = float(np.min(finite))
    noise = extra.get("noise")
    if noise:
        if "per_tensor" in noise:
            small_pair, big_pair, (b_small, b_big), steps = noise["per_tensor"]
            small, big = _host(small_pair), _host(big_pair)
            g2, s, b = noise_scale(float(small.sum()), float(big.sum()), b_small, b_big)
            summary.update({"noise/B_simple": b, "noise/G2": g2, "noise/S": s, "noise/steps": float(steps),
                            "noise/batch_small": b_small, "noise/batch_big": b_big})
            layers_small: dict[int, float] = {}
            layers_big: dict[int, float] = {}
            for n, i in by_name.items():
                layer = layer_of(n)
                if layer is not None:
                    layers_small[layer] = layers_small.get(layer, 0.0) + float(small[i])
                    layers_big[layer] = layers_big.get(layer, 0.0) + float(big[i])
            for layer in sorted(layers_small):
                summary[f"noise/B_simple/layer_{layer}"] = noise_scale(layers_small[layer], layers_big[layer], b_small, b_big)[2]
        if "explicit" in noise:
            rows = np.asarray(noise["explicit"], dtype=float)
            small, big = rows[:, 0].mean(), rows[:, 2].mean()
            g2, s, b = noise_scale(small, big, rows[:, 1].mean(), rows[:, 3].mean())
            summary.update({"noise/B_simple": b, "noise/G2": g2, "noise/S": s, "noise/steps": float(len(rows))})
