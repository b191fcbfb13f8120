"""Embedding geometry: exact all-pairs cosine structure of a vocabulary, never holding V × V.

Rows are normalised once; blocks of rows go through one GEMM against the rows after them (the
upper triangle only, so each unordered pair is computed once and the GEMM work is halved), and
each block is folded into fixed-bin histograms, running moments and per-token neighbour counts
by one fused pass (see ``cosine_kernel``), then dropped. Memory is O(block × V), the block size
chosen from ``max_memory``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..anatomy import Anatomy, build_anatomy
from ..config import Config
from .cosine_kernel import BlockTotals, reduce_block
from ..errors import LayerscopeError
from ..sources import Source, open_source
from .spectrum import resolve_device
from .untrained import untrained_rows
from ..store import Store

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
GEOMETRY_VERSION = "1"


@dataclass(frozen=True)
class GeometryOptions:
    threshold: float = 0.7
    bins: int = 100
    lo: float = -0.5
    hi: float = 1.0
    max_memory: int = 1 << 30  # bytes for the block of cosines in flight (plus the unit rows themselves)
    precision: str = "float32"  # GEMM precision; float64 makes every count exact against float64
    top_hubs: int = 20
    sample: int | None = None  # estimate from this many random pairs instead of all of them
    seed: int = 0
    exclude_untrained: bool = False  # leave out the rows ``untrained.RULE`` marks

    def key(self) -> str:
        fields = {k: v for k, v in self.__dict__.items() if k != "max_memory"}
        if not self.exclude_untrained:  # results stored before the option existed stay valid
            fields.pop("exclude_untrained")
        return json.dumps({**fields, "version": GEOMETRY_VERSION}, sort_keys=True)


class Vocabulary:
    """Token ids <-> text through the model's tokenizer.json, if it has one. Without one, a
    256-token vocabulary is taken as bytes (byte-level models such as nanoGPT on raw text)."""

    def __init__(self, tokenizer_file: Path | None, byte_level: bool = False):
        self.byte_level = byte_level and tokenizer_file is None
        self.tokenizer = None
        self.note: str | None = None  # why tokens are shown as #id although a tokenizer file exists
        if tokenizer_file is not None:
            try:
                from tokenizers import Tokenizer

                self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
                self.tokenizer.no_padding()  # some tokenizer.json files pad every encoding to a fixed length
                self.tokenizer.no_truncation()
            except Exception as exc:  # an unreadable tokenizer only costs the decoding, but says so
                self.tokenizer = None
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                self.note = f"cannot read {Path(tokenizer_file).name} ({first}): tokens are shown as #id"
                logging.getLogger("layerscope").warning("warning: %s", self.note)

    @classmethod
    def of(cls, source: Source, anatomy: Anatomy) -> "Vocabulary":
        return cls(source.tokenizer_file, byte_level=anatomy.dims.vocab_size == 256)

    def text(self, token_id: int) -> str:
        if self.tokenizer is None:
            if self.byte_level and 0 <= token_id < 128:
                return chr(token_id)
            return f"<0x{token_id:02X}>" if self.byte_level and token_id < 256 else f"#{token_id}"
        piece = self.tokenizer.id_to_token(int(token_id))
        decoded = self.tokenizer.decode([int(token_id)], skip_special_tokens=False)
        if decoded.strip():
            return decoded
        return piece if piece and piece.strip() else f"#{token_id}"

    def lookup(self, word: str) -> int:
        if self.tokenizer is None:
            if self.byte_level and len(word) == 1 and ord(word) < 128:
                return ord(word)
            if word.lstrip("#").isdigit():
                return int(word.lstrip("#"))
            raise LayerscopeError(f"--tokens {word!r}: this model has no tokenizer.json; pass token ids such as #1234")
        for candidate in (word, "Ġ" + word, "▁" + word, word.lower()):
            token_id = self.tokenizer.token_to_id(candidate)
            if token_id is not None:
                return int(token_id)
        ids = self.tokenizer.encode(word, add_special_tokens=False).ids
        if len(ids) == 1:
            return int(ids[0])
        raise LayerscopeError(f"--tokens {word!r}: not a single token of this vocabulary (it encodes to {len(ids)} tokens)")


CHUNK_ROWS = 8192  # rows converted to float64 at a time: the input is never copied whole


def _row_norms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 row norms and the float64 sum of the rows, in chunks."""
    norms = torch.empty(x.shape[0], dtype=torch.float64)
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for s in range(0, x.shape[0], CHUNK_ROWS):
        block = x[s:s + CHUNK_ROWS].to(torch.float64)
        norms[s:s + CHUNK_ROWS] = torch.linalg.vector_norm(block, dim=1)
        total += block.sum(dim=0)
    return norms, total


def _normalised(x: torch.Tensor, norms: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """Unit rows (zero rows dropped) in ``dtype``, normalised in float64 chunk by chunk."""
    valid = torch.nonzero(norms > 0).squeeze(1)
    xn = torch.empty((len(valid), x.shape[1]), dtype=dtype)
    for s in range(0, len(valid), CHUNK_ROWS):
        rows = valid[s:s + CHUNK_ROWS]
        xn[s:s + CHUNK_ROWS] = (x[rows].to(torch.float64) / norms[rows, None]).to(dtype)
    return xn, valid.numpy()


def _percentiles(counts: np.ndarray, below: int, above: int, lo: float, width: float) -> dict[str, float | None]:
    n = below + int(counts.sum()) + above
    cumulative = below + np.cumsum(counts)
    out: dict[str, float | None] = {}
    for q in PERCENTILES:
        target = q / 100.0 * n
        if target <= below or target > cumulative[-1]:
            out[f"p{q}"] = None  # outside the histogram's range
            continue
        k = int(np.searchsorted(cumulative, target, side="left"))
        before = cumulative[k - 1] if k else below
        frac = (target - before) / counts[k] if counts[k] else 0.0
        out[f"p{q}"] = lo + (k + frac) * width
    return out


def cosine_geometry(x: torch.Tensor, opts: GeometryOptions = GeometryOptions(), device: str = "cpu",
                    progress: Callable[[int, int], None] | None = None, use_numba: bool = True) -> dict[str, Any]:
    """All-pairs cosine statistics of the rows of ``x`` (V × d); see the module docstring."""
    if x.dim() != 2 or min(x.shape) < 2:
        raise LayerscopeError(f"embedding geometry needs a V × d matrix with V, d ≥ 2, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise LayerscopeError(f"embedding geometry needs floating-point weights, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise LayerscopeError("embedding matrix contains NaN or Inf values")
    dtype = torch.float64 if opts.precision == "float64" else torch.float32
    norms, row_sum = _row_norms(x)
    xn, valid = _normalised(x, norms, dtype)
    v, d = xn.shape
    result: dict[str, Any] = {"vocab_size": int(x.shape[0]), "dim": int(d), "zero_rows": int(x.shape[0] - v),
                              "precision": opts.precision}
    result.update(_isotropy_and_norms(row_sum / x.shape[0], norms))
    if opts.sample:
        result.update(_sampled(xn, opts))
        return result
    dev = resolve_device(device)
    xd = xn.to(dev)
    itemsize = xn.element_size()
    block = int(max(1, min(v, opts.max_memory // max(1, v * (itemsize + 1)))))
    totals = BlockTotals(opts.bins, v)
    for start in range(0, v - 1, block):
        c = xd[start:start + block] @ xd[start:].T
        if dev.type != "cpu" and use_numba:
            c = c.cpu()
        reduce_block(totals, c, start, start, opts.lo, opts.hi, opts.threshold, use_numba)
        del c
        if progress:
            progress(min(start + block, v), v)
    width = (opts.hi - opts.lo) / opts.bins
    neighbours = totals.neighbours
    hub_order = np.argsort(-neighbours, kind="stable")[:opts.top_hubs]
    result.update({
        "method": "exact",
        "pairs": int(totals.n),
        "mean": totals.mean,
        "std": math.sqrt(totals.m2 / totals.n) if totals.n else math.nan,
        "histogram": {"edges": [opts.lo + i * width for i in range(opts.bins + 1)], "counts": totals.counts.tolist(),
                      "below": totals.below, "above": totals.above},
        "percentiles": _percentiles(totals.counts, totals.below, totals.above, opts.lo, width),
        "percentile_error": width,
        "threshold": {
            "value": opts.threshold,
            "pairs_above": int(neighbours.sum() // 2),
            "neighbors_per_token": {"mean": float(neighbours.mean()), "max": int(neighbours.max()),
                                    "tokens_with_neighbors": int((neighbours > 0).sum())},
            "top_hubs": [{"id": int(valid[i]), "neighbors": int(neighbours[i])} for i in hub_order if neighbours[i] > 0],
        },
        "block_rows": block,
    })
    result["neighbor_counts"] = neighbours  # per valid row; dropped before storing
    result["valid_rows"] = valid
    return result


def _isotropy_and_norms(mean_vec: torch.Tensor, norms: torch.Tensor) -> dict[str, Any]:
    n = norms.numpy()
    return {
        "isotropy": {"mean_vector_norm_over_mean_norm": float(torch.linalg.vector_norm(mean_vec)) / float(n.mean())},
        "norms": {"mean": float(n.mean()), "std": float(n.std()), "min": float(n.min()), "max": float(n.max()),
                  **{f"p{q}": float(np.percentile(n, q)) for q in PERCENTILES}},
    }


def _sampled(xn: torch.Tensor, opts: GeometryOptions) -> dict[str, Any]:
    g = torch.Generator().manual_seed(opts.seed)
    v = xn.shape[0]
    i = torch.randint(0, v, (opts.sample,), generator=g)
    j = torch.randint(0, v - 1, (opts.sample,), generator=g)
    j = j + (j >= i).long()  # uniform over j != i
    cos = (xn[i].double() * xn[j].double()).sum(dim=1).numpy()
    mean, std = float(cos.mean()), float(cos.std(ddof=1))
    half = 1.96 * std / math.sqrt(len(cos))
    above = float((cos > opts.threshold).mean())
    return {"method": "sample", "pairs": v * (v - 1) // 2, "sampled_pairs": int(opts.sample), "mean": mean, "std": std,
            "mean_ci95": [mean - half, mean + half],
            "threshold": {"value": opts.threshold, "fraction_above": above,
                          "fraction_above_ci95_halfwidth": 1.96 * math.sqrt(max(above * (1 - above), 1e-300) / len(cos))},
            "percentiles": {f"p{q}": float(np.percentile(cos, q)) for q in PERCENTILES}}


def nearest_neighbours(x: torch.Tensor, token_id: int, k: int = 10, exclude=None) -> list[tuple[int, float]]:
    """The k rows most cosine-similar to row ``token_id`` (float64, in chunks), rows ``exclude`` left out."""
    norms, _ = _row_norms(x)
    target = x[token_id].to(torch.float64)
    cos = torch.empty(x.shape[0], dtype=torch.float64)
    for s in range(0, x.shape[0], CHUNK_ROWS):
        cos[s:s + CHUNK_ROWS] = x[s:s + CHUNK_ROWS].to(torch.float64) @ target
    cos /= norms.clamp_min(1e-300) * max(float(norms[token_id]), 1e-300)
    cos[token_id] = -math.inf
    if exclude is not None and len(exclude):
        cos[torch.as_tensor(np.asarray(exclude, dtype=np.int64))] = -math.inf
    top = torch.topk(cos, min(k, x.shape[0] - 1))
    return [(int(i), float(c)) for c, i in zip(top.values, top.indices)]


@dataclass
class EmbeddingsResult:
    matrices: dict[str, dict[str, Any]]  # by role: embed.token, lm_head
    source: Source
    anatomy: Anatomy

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source.label, "matrices": self.matrices}

    def save(self, path) -> Path:
        from ..views import write_json

        return write_json(self.to_json(), path)


def embedding_entries(anatomy: Anatomy, source: Source):
    embed = [e for e in anatomy.by_role("embed.token") if len(e.shape) == 2]
    if not embed:
        raise LayerscopeError(f"{source.label}: no token embedding matrix found (role embed.token)")
    out = [embed[0]]
    heads = [e for e in anatomy.by_role("lm_head") if len(e.shape) == 2]
    if heads and anatomy.tied_embeddings is not True:
        out.append(heads[0])
    return out


def embeddings(source: Any, config: Config | None = None, *, options: GeometryOptions = GeometryOptions(),
               tokens: list[str] | None = None, revision: str | None = None,
               progress: Callable[[str, int, int], None] | None = None, cached_only: bool = False,
               **overrides: Any) -> EmbeddingsResult:
    """Cosine geometry of the token embedding and (when untied) of the lm_head.

    ``cached_only``: return only what the store already holds (the report shows a section for an
    analysis that has been run, without running it)."""
    config = (config or Config()).replace(**overrides)
    src = open_source(source, revision)
    anatomy = build_anatomy(src.infos, src.config)
    vocab = Vocabulary.of(src, anatomy)
    token_ids = [(word, vocab.lookup(word)) for word in tokens or []]
    out: dict[str, dict[str, Any]] = {}
    with Store(config.resolved_store()) as store:
        for entry in embedding_entries(anatomy, src):
            x, digest = src.read(entry.name)
            if out and any(r.get("content_hash") == digest for r in out.values()):
                continue  # an lm_head identical to the embedding is the same geometry
            geometry = store.artifact(digest, "embeddings", options.key()) if config.cache else None
            if geometry is None and cached_only:
                continue
            untrained = untrained_rows(x, vocab)
            keep = np.setdiff1d(np.arange(x.shape[0]), untrained.ids) if options.exclude_untrained else None
            if geometry is None:
                cb = (lambda done, total, _n=entry.name: progress(_n, done, total)) if progress else None
                geometry = cosine_geometry(x if keep is None else x[torch.from_numpy(keep)], options, config.device, cb)
                geometry.pop("neighbor_counts", None)
                geometry.pop("valid_rows", None)
                if keep is not None:  # ids of the kept rows back to vocabulary ids
                    for hub in geometry.get("threshold", {}).get("top_hubs", []):
                        hub["id"] = int(keep[hub["id"]])
                store.put_artifact(digest, "embeddings", options.key(), geometry)
            geometry = {"name": entry.name, "role": entry.role, "content_hash": digest, **geometry,
                        "untrained": {**untrained.summary(), "excluded": options.exclude_untrained}}
            for hub in geometry.get("threshold", {}).get("top_hubs", []):
                hub["text"] = vocab.text(hub["id"])
                hub["untrained"] = hub["id"] in untrained
            if token_ids:
                geometry["nearest"] = {
                    word: [{"id": i, "text": vocab.text(i), "cosine": c, "untrained": i in untrained}
                           for i, c in nearest_neighbours(x, tid, exclude=untrained.ids if keep is not None else None)]
                    for word, tid in token_ids}
            if vocab.note:
                geometry["notes"] = [vocab.note]
            out[entry.role] = geometry
    return EmbeddingsResult(out, src, anatomy)
