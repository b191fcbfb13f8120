"""Sum a per-parameter quantity (a diagonal Fisher, a pruning score...) per tensor, layer, head, neuron.

The groups come from the anatomy, so they are the ones the weight analyses use:

* tensor — every probe parameter;
* layer — the anatomy's layer index; parameters outside any layer (embeddings, final norm, an
  untied head) form one ``outside`` group;
* head — ``RunnableModel.head_slices`` (q/k/v/o weights and q/k/v biases, fused matrices split,
  GQA-aware). A query head owns its q rows and its o columns; a key/value head is shared by the
  ``n_heads / n_kv_heads`` query heads of its group, so each of them is credited an equal share of
  it. Every attention entry is thus counted exactly once, and the heads of a layer sum to the
  layer's attention tensors (tested);
* neuron — an MLP neuron j owns row j of the up and gate projections (and entry j of their biases)
  and column j of the down projection, in the model's (out, in) sense; the anatomy says when a
  tensor is stored transposed (GPT-2's Conv1D). Fused gate_up matrices split in halves. MoE experts
  are not split per neuron.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
import torch

from .model import RunnableModel

OUTSIDE = "outside"
NEURON_ROLES = ("mlp.up", "mlp.gate", "mlp.down", "mlp.gate_up")


def _total(t: torch.Tensor) -> float:
    return float(t.double().sum())


def tensor_table(model: RunnableModel, values: Mapping[str, torch.Tensor], column: str = "fisher") -> pd.DataFrame:
    rows = []
    for name, v in values.items():
        v64 = v.double()
        rows.append({"name": name, "role": model.role(name), "layer": model.layer(name), "numel": v.numel(),
                     column: float(v64.sum()), f"{column}_mean": float(v64.mean()) if v.numel() else float("nan"),
                     f"{column}_max": float(v64.max()) if v.numel() else float("nan")})
    frame = pd.DataFrame(rows)
    if len(frame):
        frame["layer"] = frame["layer"].astype("Int64")
        total = frame[column].sum()
        frame["share"] = frame[column] / total if total > 0 else float("nan")
    return frame


def layer_table(model: RunnableModel, values: Mapping[str, torch.Tensor], column: str = "fisher") -> pd.DataFrame:
    sums: dict[object, list[float]] = {}
    for name, v in values.items():
        layer = model.layer(name)
        key = OUTSIDE if layer is None else layer
        acc = sums.setdefault(key, [0.0, 0])
        acc[0] += _total(v)
        acc[1] += v.numel()
    rows = [{"layer": k, column: s, "numel": n, f"{column}_mean": s / n if n else float("nan")} for k, (s, n) in sums.items()]
    rows.sort(key=lambda r: (1, 0) if r["layer"] == OUTSIDE else (0, r["layer"]))
    frame = pd.DataFrame(rows)
    if len(frame):
        total = frame[column].sum()
        frame["share"] = frame[column] / total if total > 0 else float("nan")
    return frame


def head_pieces(model: RunnableModel, values: Mapping[str, torch.Tensor]) -> dict[tuple[int, str, int], list[torch.Tensor]]:
    """{(layer, kind, head): [the entries of each tensor that belong to it]} (kind q/k/v/o; k and v
    heads are key/value heads)."""
    out: dict[tuple[int, str, int], list[torch.Tensor]] = {}
    for name, v in values.items():
        layer = model.layer(name)
        for s in model.head_slices(name):
            out.setdefault((layer if layer is not None else -1, s.kind, s.head), []).append(s.select(v).reshape(-1))
    return out


def head_table(model: RunnableModel, values: Mapping[str, torch.Tensor], column: str = "fisher") -> pd.DataFrame:
    """One row per (layer, query head): q, k, v, o parts (k/v: the head's equal share of its key/value
    head) and their sum ``column``."""
    d = model.anatomy.dims
    pieces = head_pieces(model, values)
    if not pieces:
        return pd.DataFrame(columns=["layer", "head", "kv_head", "q", "k", "v", "o", column])
    n_q = d.n_heads or 1
    n_kv = d.n_kv_heads or n_q
    group = max(1, n_q // n_kv)
    sums = {k: sum(_total(t) for t in ts) for k, ts in pieces.items()}
    rows = []
    for layer in sorted({k[0] for k in sums}):
        for h in range(n_q):
            kv = h // group
            row = {"layer": layer, "head": h, "kv_head": kv,
                   "q": sums.get((layer, "q", h), 0.0), "o": sums.get((layer, "o", h), 0.0),
                   "k": sums.get((layer, "k", kv), 0.0) / group, "v": sums.get((layer, "v", kv), 0.0) / group}
            row[column] = row["q"] + row["k"] + row["v"] + row["o"]
            rows.append(row)
    return pd.DataFrame(rows)


def neuron_axis(model: RunnableModel, name: str, shape: tuple[int, ...]) -> tuple[str, int] | None:
    """(part, axis) where ``axis`` indexes MLP neurons in tensor ``name``; None if it has none."""
    e = model.anatomy.entries.get(name)
    if e is None:
        return None
    if name.endswith(".bias") and len(shape) == 1:
        base = model.anatomy.entries.get(name[: -len(".bias")] + ".weight")
        if base is not None and base.role in ("mlp.up", "mlp.gate") and (model.anatomy.dims.d_ff in (None, shape[0])):
            return base.role.split(".")[1], 0
        return None
    if len(shape) != 2 or e.role not in NEURON_ROLES:
        return None
    if e.role == "mlp.down":
        return "down", 0 if e.transposed else 1
    part = {"mlp.up": "up", "mlp.gate": "gate", "mlp.gate_up": "gate_up"}[e.role]
    return part, 1 if e.transposed else 0


def neuron_table(model: RunnableModel, values: Mapping[str, torch.Tensor], column: str = "fisher") -> pd.DataFrame:
    """One row per (layer, neuron): the up, gate and down parts and their sum ``column``."""
    parts: dict[int, dict[str, torch.Tensor]] = {}
    for name, v in values.items():
        where = neuron_axis(model, name, tuple(v.shape))
        layer = model.layer(name)
        if where is None or layer is None:
            continue
        part, axis = where
        v64 = v.double()
        per = v64 if v.dim() == 1 else v64.sum(dim=1 - axis)
        layer_parts = parts.setdefault(layer, {})
        if part == "gate_up":
            gate, up = per.chunk(2)
            for p, t in (("gate", gate), ("up", up)):
                layer_parts[p] = layer_parts.get(p, 0) + t.cpu()
        else:
            layer_parts[part] = layer_parts.get(part, 0) + per.cpu()
    frames = []
    for layer in sorted(parts):
        p = parts[layer]
        width = max(t.numel() for t in p.values())
        cols = {k: (p[k] if k in p and p[k].numel() == width else torch.zeros(width, dtype=torch.float64))
                for k in ("up", "gate", "down")}
        frame = pd.DataFrame({"layer": layer, "neuron": np.arange(width), **{k: c.numpy() for k, c in cols.items()}})
        frame[column] = frame["up"] + frame["gate"] + frame["down"]
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["layer", "neuron", "up", "gate", "down", column])
    return pd.concat(frames, ignore_index=True)
