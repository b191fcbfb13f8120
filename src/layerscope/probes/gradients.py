"""Gradient health on data: where the gradient goes, how noisy it is, and which MLP neurons never fire.

All numbers refer to the probe loss L (mean token cross-entropy over the fixed batches) at the
checkpoint's weights, and are aggregated per tensor, per layer (the anatomy's layer index; tensors
outside layers by role) and for the whole model. Squared norms add over tensors, so every
aggregate is exact, not an average of ratios.

* **Norms**: ``grad_norm`` = ‖∇L‖ of the group, ``share`` = its ‖∇L‖² over the model's,
  ``grad_to_weight`` = ‖∇L‖ / ‖θ‖.
* **Gradient noise scale** (McCandlish et al. 2018, "An empirical model of large-batch training"):
  B_simple = tr(Σ) / |G|², Σ the covariance of one example's gradient (an example is one sequence
  of ``seq_len`` tokens), G the true gradient. Two estimators:

  - *per-example*: exact per-example gradients (``torch.func.vmap(grad(...))``, chunked); tr(Σ) =
    n/(n−1) · (mean ‖g_i‖² − ‖ḡ‖²) and |G|² = ‖ḡ‖² − tr(Σ)/n (both unbiased);
  - *two batch sizes*: from the gradients of batches of b = ``batch_size`` examples and of all n:
    |G|² = (n‖G_n‖² − b·mean‖G_b‖²)/(n − b), S = (mean‖G_b‖² − ‖G_n‖²)/(1/b − 1/n), B = S / |G|²
    (the estimator that needs no per-example gradients; what training can measure for free).

  Each comes with a jackknife standard error over the batches (leave one batch out). Reading:
  B_simple approximates the critical batch size — training with batches much smaller than it
  spends more steps than needed (steps grow as 1 + B_simple/B), much larger wastes examples
  (examples grow as 1 + B/B_simple). When |G|² is not significantly above zero the noise dominates
  the signal at this data size and B_simple is reported as not measurable (NaN).
* **Gradient signal-to-noise** per group: the mean over its entries of μ_j² / σ_j² (GSNR, Liu et
  al. 2020), μ_j the mean and σ_j² the variance of entry j over examples (entries with σ_j = 0
  left out).
* **Vanishing / exploding** (:data:`FLAG_RULE`): a layer is flagged when its gradient-to-weight
  ratio is more than 10× (and 3 robust standard deviations) below or above the median of its
  peers (the other layers).
* **Dead and always-on MLP neurons** (:data:`NEURON_RULE`): hooks on the input of each layer's
  MLP down projection (found through the anatomy's ``mlp.down`` role), i.e. the activation
  ``act(x W_up)`` (or ``act(x W_gate) · x W_up`` for gated MLPs) that the down projection reads.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..errors import LayerscopeError
from .objective import Objective, _rows

FLAG_RULE = ("vanishing / exploding: a layer whose gradient-to-weight ratio ‖∇L‖/‖θ‖ lies more than max(3 robust "
             "standard deviations (1.4826·MAD of log10 ratios), one decade) below / above the median over the layers; "
             "needs at least 3 layers")
NEURON_RULE = ("a neuron is active on a token when the activation the down projection reads is > {threshold} (for GELU, "
               "ReLU and SiLU this is exactly 'pre-activation > 0'; for gated MLPs, |activation| > {gated} and "
               "always-on is not defined); dead = active on none of the {tokens} tokens, always-on = active on all. "
               "A neuron active on more than 3/N of tokens would show at least once with probability > 95%")
NOISE_READING = ("B_simple ≈ the critical batch size (McCandlish et al. 2018): batches much smaller than it take "
                 "~(1 + B_simple/B)× the optimal number of steps, much larger ones ~(1 + B/B_simple)× the examples; "
                 "in examples of {seq_len} tokens")


@dataclass(frozen=True)
class GradientOptions:
    """per_example: also the exact per-example estimator, GSNR (needs vmap(grad); costs ~1 gradient
    per example). threshold: activity threshold of MLP neurons. chunk: examples per vmap (None: from
    a memory budget)."""

    per_example: bool = True
    threshold: float = 0.0
    gated_threshold: float = 1e-6
    chunk: int | None = None
    neurons: bool = True

    def key(self) -> str:
        return json.dumps({"per_example": self.per_example, "threshold": self.threshold,
                           "gated_threshold": self.gated_threshold, "neurons": self.neurons, "v": 1}, sort_keys=True)


# -- CLI hooks (for `layerscope probe --gradients`) -------------------------------------------------
def from_args(args: argparse.Namespace) -> GradientOptions | None:
    """GradientOptions when ``--gradients`` was given, else None."""
    if not getattr(args, "gradients", False):
        return None
    return GradientOptions(per_example=not getattr(args, "no_per_example", False),
                           threshold=float(getattr(args, "activity_threshold", 0.0)))


# -- result -----------------------------------------------------------------------------------------
@dataclass
class GradientHealth:
    tensors: Any  # DataFrame: one row per parameter tensor
    groups: Any  # DataFrame: one row per layer (and per role outside layers), then "model"
    noise: dict[str, Any]  # model-level noise scale from both estimators, with errors and the reading
    neurons: Any  # DataFrame: per layer, neurons, dead, always_on (or None)
    rules: dict[str, str] = field(default_factory=dict)
    data_description: str = ""

    def to_dict(self) -> dict[str, Any]:
        def records(frame):
            return None if frame is None else json.loads(frame.to_json(orient="records"))

        return {"tensors": records(self.tensors), "groups": records(self.groups), "noise": self.noise,
                "neurons": records(self.neurons), "rules": self.rules, "data": self.data_description}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GradientHealth":
        import pandas as pd

        frame = lambda rows: None if rows is None else pd.DataFrame(rows)  # noqa: E731
        return cls(frame(d["tensors"]), frame(d["groups"]), d["noise"], frame(d["neurons"]), d["rules"], d.get("data", ""))

    def save(self, path) -> Any:
        from ..views import write_json

        return write_json(self.to_dict(), path)


# -- accumulation ----------------------------------------------------------------------------------------
def _group_of(model, name: str) -> str:
    layer = model.layer(name)
    if layer is not None:
        return f"layer {layer}"
    role = model.role(name)
    return {"embed.token": "embeddings", "embed.position": "embeddings", "embed.type": "embeddings",
            "lm_head": "lm_head"}.get(role, "other" if role not in ("norm",) else "final norm")


def _full_gradient(obj: Objective, names: list[str]) -> list[torch.Tensor]:
    params = [obj.model.params[n] for n in names]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for b in range(obj.n_batches):
        grads = torch.autograd.grad(obj.batch_term(b), params, allow_unused=True)
        for t, g in zip(total, grads):
            if g is not None:
                t.add_(g.double())
    return total


def _batch_gradient(obj: Objective, names: list[str], b: int) -> list[torch.Tensor]:
    params = [obj.model.params[n] for n in names]
    grads = torch.autograd.grad(obj.batch_term(b), params, allow_unused=True)
    return [g.double() if g is not None else torch.zeros_like(p, dtype=torch.float64) for g, p in zip(grads, params)]


def _chunk_size(obj: Objective, options: GradientOptions, batch_rows: int) -> int:
    if options.chunk:
        return max(1, options.chunk)
    param_bytes = sum(p.numel() for p in obj.model.params.values()) * 4
    budget = (1 << 30) if obj.model.device.type != "cuda" else int(torch.cuda.mem_get_info(obj.model.device)[0] * 0.4)
    return int(max(1, min(batch_rows, budget // max(1, 6 * param_bytes))))


def gradient_health(objective: Objective, options: GradientOptions | None = None, *, store: Any = None,
                    progress: Callable[[str, int, int], None] | None = None) -> GradientHealth:
    """Gradient health of ``objective``'s model on its data (see the module docstring); cached in
    ``store`` under (weights hash, data hash, options)."""
    from . import probe_key

    options = options or GradientOptions()
    obj = objective
    model = obj.model
    key = f"{probe_key(model, obj.data)}"
    if store is not None:
        cached = store.artifact(key, "gradients", options.key())
        if cached is not None:
            return GradientHealth.from_dict(cached)
    names = list(model.params)
    n_batches = obj.n_batches
    if n_batches < 2:
        raise LayerscopeError("gradient health needs at least 2 batches (--batches 2): the noise scale compares batches")
    steps = 2 * n_batches + (n_batches if options.per_example else 0) + (1 if options.neurons else 0)
    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress:
            progress("gradients", done, steps)

    # pass 1: the full gradient A = ∇L
    full = [torch.zeros_like(p, dtype=torch.float64) for p in model.params.values()]
    for b in range(n_batches):
        for t, g in zip(full, _batch_gradient(obj, names, b)):
            t.add_(g)
        tick()
    n_t = len(names)
    A2 = np.array([float((a * a).sum()) for a in full])  # ‖A_t‖² per tensor
    weights_b = np.array([float(obj.example_weights(b).sum()) for b in range(n_batches)])  # W_b: batch b's share of L
    rows_b = np.array([int(obj.example_weights(b).numel()) for b in range(n_batches)])
    # pass 2: batch gradients a_b (the contribution of batch b to ∇L): ‖a_b‖², ⟨A, a_b⟩ per tensor
    a2 = np.zeros((n_batches, n_t))
    Aa = np.zeros((n_batches, n_t))
    for b in range(n_batches):
        for i, (g, a) in enumerate(zip(_batch_gradient(obj, names, b), full)):
            a2[b, i] = float((g * g).sum())
            Aa[b, i] = float((g * a).sum())
        tick()
    # pass 3: per-example gradients: Σ p_i ‖g_i‖² per batch and tensor, Σ p_i g_i² per entry
    s1 = np.zeros((n_batches, n_t)) if options.per_example else None
    sq = [torch.zeros_like(a) for a in full] if options.per_example else None
    if options.per_example:
        params = {n: p.detach() for n, p in model.params.items()}
        grad_fn = torch.func.vmap(torch.func.grad(obj.per_example_loss), in_dims=(None, 0))
        for b in range(n_batches):
            x, y = obj.examples(b)
            w = obj.example_weights(b).to(torch.float64)
            p = (w / w.sum()).to(model.device)  # within-batch weights; the batch's share is W_b
            rows = int(w.numel())
            step = _chunk_size(obj, options, rows)
            for s in range(0, rows, step):
                xs = _rows(x, s, s + step)
                ys = _rows(y, s, s + step)
                g = grad_fn(params, (xs, ys))
                pw = p[s:s + step] * weights_b[b]
                for i, n in enumerate(names):
                    gi = g[n].double()
                    flat = gi.reshape(gi.shape[0], -1)
                    s1[b, i] += float((pw * (flat * flat).sum(dim=1)).sum())
                    sq[i].add_((pw.view(-1, *[1] * (gi.dim() - 1)) * gi * gi).sum(dim=0))
                del g
            tick()
    import pandas as pd

    groups = [_group_of(model, n) for n in names]
    theta2 = np.array([float(p.detach().double().pow(2).sum()) for p in model.params.values()])
    # GSNR per tensor: Σ_j μ_j²/σ_j² and the count of entries with σ_j > 0 (aggregated later)
    n_examples = int(rows_b.sum())
    gsnr_sum = np.full(n_t, np.nan)
    gsnr_cnt = np.zeros(n_t)
    if options.per_example:
        corr = n_examples / (n_examples - 1)
        for i, a in enumerate(full):
            var = (sq[i] - a * a) * corr
            ok = var > 1e-10 * sq[i]  # entries that vary over examples (not round-off of a constant)
            gsnr_sum[i] = float(((a * a)[ok] / var[ok]).sum())
            gsnr_cnt[i] = float(ok.sum())
    tensor_rows = []
    for i, n in enumerate(names):
        tensor_rows.append({"name": n, "role": model.role(n), "layer": model.layer(n), "group": groups[i],
                            "numel": int(model.params[n].numel()), "grad_norm": math.sqrt(A2[i]),
                            "share": A2[i] / A2.sum() if A2.sum() > 0 else math.nan,
                            "weight_norm": math.sqrt(theta2[i]),
                            "grad_to_weight": math.sqrt(A2[i] / theta2[i]) if theta2[i] > 0 else math.nan,
                            "gsnr": gsnr_sum[i] / gsnr_cnt[i] if gsnr_cnt[i] else math.nan})
    tensors = pd.DataFrame(tensor_rows)
    tensors["layer"] = tensors["layer"].astype("Int64")
    # per group and for the model
    order = sorted(set(groups), key=lambda g: (0, int(g.split()[1])) if g.startswith("layer ") else (1, g))
    group_rows = []
    model_noise = None
    for g in order + ["model"]:
        idx = np.array([i for i, x in enumerate(groups) if g == "model" or x == g])
        est = _noise_estimates(A2[idx].sum(), a2[:, idx].sum(1), Aa[:, idx].sum(1), weights_b, rows_b,
                               s1[:, idx].sum(1) if s1 is not None else None)
        row = {"group": g, "layer": int(g.split()[1]) if g.startswith("layer ") else None,
               "tensors": len(idx), "grad_norm": math.sqrt(A2[idx].sum()),
               "share": A2[idx].sum() / A2.sum() if A2.sum() > 0 else math.nan,
               "grad_to_weight": math.sqrt(A2[idx].sum() / theta2[idx].sum()) if theta2[idx].sum() > 0 else math.nan,
               "gsnr": (np.nansum(gsnr_sum[idx]) / gsnr_cnt[idx].sum()) if gsnr_cnt[idx].sum() else math.nan,
               "B_simple": est.get("per_example", {}).get("B_simple", math.nan),
               "B_simple_se": est.get("per_example", {}).get("se", math.nan),
               "B_simple_two_batch": est["two_batch"]["B_simple"], "B_simple_two_batch_se": est["two_batch"]["se"]}
        group_rows.append(row)
        if g == "model":
            model_noise = est
    frame = pd.DataFrame(group_rows)
    frame["layer"] = frame["layer"].astype("Int64")
    frame["flag"] = _flags(frame)
    seq_len = int(obj.data.input_ids.shape[-1]) if obj.data.input_ids is not None else None
    noise = {**model_noise, "examples": n_examples, "batch_size": int(rows_b[0]), "batches": n_batches,
             "seq_len": seq_len,
             "reading": NOISE_READING.format(seq_len=seq_len if seq_len else "one input")}
    neurons = None
    rules = {"flags": FLAG_RULE, "noise": noise["reading"]}
    if options.neurons and obj.data.input_ids is not None:
        neurons, tokens = mlp_neuron_activity(obj, options)
        rules["neurons"] = NEURON_RULE.format(threshold=options.threshold, gated=options.gated_threshold, tokens=tokens)
        tick()
    result = GradientHealth(tensors, frame, noise, neurons, rules, obj.data.description)
    if store is not None:
        store.put_artifact(key, "gradients", options.key(), result.to_dict())
    return result


def _noise_estimates(A2: float, a2: np.ndarray, Aa: np.ndarray, W: np.ndarray, rows: np.ndarray,
                     s1: np.ndarray | None) -> dict[str, Any]:
    """Both estimators of |G|², tr(Σ), B_simple from per-batch scalars, with leave-one-batch-out
    jackknife standard errors.

    A2 = ‖A‖² (A = ∇L = Σ_b a_b); a2[b] = ‖a_b‖²; Aa[b] = ⟨A, a_b⟩; W[b] = batch b's share of L;
    rows[b] its examples; s1[b] = Σ_{i∈b} p_i ‖g_i‖² with p_i an example's share of L."""
    nb = len(W)

    def two_batch(A2_, a2_, W_, rows_):
        n, b = rows_.sum(), rows_.mean()
        if n <= b:  # one batch left (a 2-batch jackknife): no second batch size
            return math.nan, math.nan
        gb2 = float(np.mean(a2_ / W_ ** 2))  # mean ‖G_b‖² (batch-mean gradients)
        gn2 = A2_ / W_.sum() ** 2  # ‖G_n‖²
        g2 = (n * gn2 - b * gb2) / (n - b)
        s = (gb2 - gn2) / (1 / b - 1 / n)
        return g2, s

    def per_example(A2_, s1_, W_, rows_):
        n = rows_.sum()
        mean_g2 = A2_ / W_.sum() ** 2
        tr = (s1_.sum() / W_.sum() - mean_g2) * n / (n - 1)
        return mean_g2 - tr / n, tr

    def leave_out(b):
        keep = np.arange(nb) != b
        # ‖A − a_b‖² = ‖A‖² − 2⟨A, a_b⟩ + ‖a_b‖²
        return A2 - 2 * Aa[b] + a2[b], keep

    out: dict[str, Any] = {}
    for name, fn, extra in (("two_batch", two_batch, a2), ("per_example", per_example, s1)):
        if extra is None:
            continue
        g2, tr = fn(A2, extra, W, rows)
        B = tr / g2 if g2 > 0 else math.nan  # NaN also when g2 is NaN
        jack = []
        for b in range(nb):
            A2b, keep = leave_out(b)
            g2b, trb = fn(A2b, extra[keep], W[keep], rows[keep])
            jack.append(trb / g2b if g2b > 0 else math.nan)
        jack = np.asarray(jack)
        se = float(np.sqrt((nb - 1) / nb * np.sum((jack - jack.mean()) ** 2))) if np.all(np.isfinite(jack)) else math.nan
        out[name] = {"B_simple": float(B), "se": se, "G2": float(g2), "trace_sigma": float(tr)}
    return out


def _flags(frame) -> list[str]:
    layered = frame[frame["layer"].notna()]
    flags = [""] * len(frame)
    if len(layered) < 3:
        return flags
    x = np.log10(layered["grad_to_weight"].to_numpy(float))
    med = float(np.median(x))
    mad = 1.4826 * float(np.median(np.abs(x - med)))
    width = max(3 * mad, 1.0)
    for pos, v in zip(layered.index, x):
        if v < med - width:
            flags[frame.index.get_loc(pos)] = "vanishing"
        elif v > med + width:
            flags[frame.index.get_loc(pos)] = "exploding"
    return flags


# -- MLP neurons ------------------------------------------------------------------------------------------
def _down_modules(model) -> list[tuple[int, str, bool]]:
    """(layer, module name, gated) of every MLP down projection the anatomy knows."""
    entries = model.anatomy.entries
    out = []
    gated_layers = {e.layer for e in entries.values() if e.role in ("mlp.gate", "mlp.gate_up")}
    for name, e in entries.items():
        if e.role == "mlp.down" and e.layer is not None and name.endswith(".weight"):
            out.append((e.layer, name[: -len(".weight")], e.layer in gated_layers))
    return sorted(out)


def mlp_neuron_activity(obj: Objective, options: GradientOptions | None = None):
    """Per layer: neurons, dead, always-on (NEURON_RULE), and how many tokens were seen."""
    import pandas as pd

    options = options or GradientOptions()
    model = obj.model
    downs = _down_modules(model)
    if not downs:
        return None, 0
    counts: dict[int, torch.Tensor] = {}
    hooks = []
    seen = {"tokens": 0}

    def hook_for(layer: int, gated: bool):
        def hook(module, inputs):
            h = inputs[0].detach()
            h = h.reshape(-1, h.shape[-1])
            active = (h.abs() > options.gated_threshold) if gated else (h > options.threshold)
            c = active.sum(dim=0).to("cpu", torch.int64)
            counts[layer] = counts[layer] + c if layer in counts else c
        return hook

    for layer, mod_name, gated in downs:
        hooks.append(model.module.get_submodule(mod_name).register_forward_pre_hook(hook_for(layer, gated)))
    try:
        with torch.no_grad():
            for b in range(obj.n_batches):
                x, y = obj.examples(b)
                model.module(input_ids=x)
                seen["tokens"] += int(x.numel())
    finally:
        for h in hooks:
            h.remove()
    rows = []
    tokens = seen["tokens"]
    for layer, mod_name, gated in downs:
        c = counts.get(layer)
        if c is None:
            continue
        dead = torch.nonzero(c == 0).flatten().tolist()
        always = [] if gated else torch.nonzero(c == tokens).flatten().tolist()
        rows.append({"layer": layer, "module": mod_name, "gated": gated, "neurons": int(c.numel()), "tokens": tokens,
                     "dead": len(dead), "always_on": math.nan if gated else len(always),
                     "dead_fraction": len(dead) / c.numel(), "dead_ids": dead[:50], "always_on_ids": always[:50],
                     "mean_active_fraction": float(c.double().mean() / tokens)})
    return pd.DataFrame(rows), tokens


def print_gradients(result: GradientHealth, console=None) -> None:
    """Console view: per-layer table, the noise scale and its reading, flags, neurons."""
    from rich.console import Console
    from rich.table import Table

    from ..views import _fmt

    console = console or Console()
    t = Table(title="gradient health per layer (‖∇L‖, share of ‖∇L‖², ‖∇L‖/‖θ‖, GSNR, B_simple)", title_justify="left")
    cols = ["group", "grad_norm", "share", "grad_to_weight", "gsnr", "B_simple", "B_simple_two_batch", "flag"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("group", "flag") else "right")
    for _, r in result.groups.iterrows():
        t.add_row(*[str(r[c]) if c in ("group", "flag") else _fmt(r[c]) for c in cols])
    console.print(t)
    n = result.noise
    pe, tb = n.get("per_example"), n["two_batch"]
    if pe:
        console.print(f"noise scale B_simple (per-example, exact): {_fmt(pe['B_simple'])} ± {_fmt(pe['se'])} examples")
    console.print(f"noise scale B_simple (two batch sizes {n['batch_size']} and {n['examples']}): "
                  f"{_fmt(tb['B_simple'])} ± {_fmt(tb['se'])} examples")
    console.print(n["reading"])
    flagged = result.groups[result.groups["flag"] != ""]
    console.print("flags: " + (", ".join(f"{g} {f}" for g, f in zip(flagged["group"], flagged["flag"])) or
                               "none (no layer's gradient-to-weight ratio is a decade off its peers)"))
    if result.neurons is not None and len(result.neurons):
        nt = Table(title="MLP neurons on the probe data", title_justify="left")
        for c in ("layer", "neurons", "dead", "always_on", "mean_active_fraction"):
            nt.add_column(c, justify="right")
        for _, r in result.neurons.iterrows():
            nt.add_row(str(r["layer"]), str(r["neurons"]), str(r["dead"]), _fmt(r["always_on"]), _fmt(r["mean_active_fraction"]))
        console.print(nt)
        console.print(result.rules.get("neurons", ""))
