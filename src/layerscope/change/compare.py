"""Compare checkpoints: per-matrix drift, spectral deltas, token drift and task vectors.

Tensors are matched by name, and where names differ (a prefix, a renamed module) by what the
anatomy says they are: the same role in the same layer. Anything that does not match is listed
and the rest is still compared. Each pair of tensors is read once, one pair at a time, and its
drift is stored under the two content hashes, so a comparison seen before costs no reading.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from ..anatomy import Anatomy, Part, build_anatomy, shape_text
from ..config import Config
from .drift import matrix_drift, task_vector_stats, token_drift
from ..weights.embeddings import Vocabulary
from ..errors import LayerscopeError
from ..sources import Source, open_source
from ..store import Store

DRIFT_COLUMNS = ["rel_change", "cosine", "procrustes_cosine", "procrustes_residual"]
DRIFT_VERSION = 1

Progress = Callable[[int, int, str], None]


@dataclass
class Model:
    """One opened checkpoint: its source, anatomy and a short label for column names."""

    source: Source
    anatomy: Anatomy
    label: str

    @classmethod
    def open(cls, spec: Any, label: str | None = None, revision: str | None = None) -> "Model":
        src = open_source(spec, revision)
        return cls(src, build_anatomy(src.infos, src.config), label or short_label(src))


GENERIC_NAMES = {"model", "models", "weights", "checkpoint", "snapshot", "hf", "final"}


def short_label(source: Source) -> str:
    """A readable name: the file stem or folder name (the parent's, when that name is generic)."""
    path = Path(source.label)
    name = path.stem if path.suffix in (".pt", ".bin", ".safetensors", ".pth", ".ckpt") else path.name
    if name.lower() in GENERIC_NAMES and path.parent.name:
        name = path.parent.name
    return name or source.label


def unique_labels(labels: list[str]) -> list[str]:
    """Labels that occur more than once get ``#1``, ``#2``, ... in order."""
    seen: dict[str, int] = {}
    out = []
    for lb in labels:
        seen[lb] = seen.get(lb, 0) + 1
        out.append(lb if seen[lb] == 1 and labels.count(lb) == 1 else f"{lb}#{seen[lb]}")
    return out


# -- matching -------------------------------------------------------------------------------------
def match_tensors(a: Anatomy, b: Anatomy) -> tuple[list[tuple[str, str]], list[str]]:
    """Pairs (name in a, name in b) of tensors that correspond, and what does not match, in words."""
    pairs: list[tuple[str, str]] = []
    only_a = [n for n in a.entries if n not in b.entries]
    only_b = [n for n in b.entries if n not in a.entries]
    for name in a.entries:
        if name in b.entries:
            pairs.append((name, name))
    # a name present on one side only may still be the same matrix under another name
    key_b = _unique_keys(b, only_b)
    for name in list(only_a):
        other = key_b.get(_anatomy_key(a, name))
        if other is not None and other in only_b:
            pairs.append((name, other))
            only_a.remove(name)
            only_b.remove(other)
    problems: list[str] = []
    if a.family != b.family:
        problems.append(f"architectures differ: {a.family} vs {b.family}")
    shape_mismatch = [(x, y) for x, y in pairs if a.entries[x].shape != b.entries[y].shape]
    for x, y in shape_mismatch:
        problems.append(f"{x}: shape {shape_text(a.entries[x].shape)} vs {shape_text(b.entries[y].shape)}")
    if only_a:
        problems.append(f"only in the first: {_names(only_a)}")
    if only_b:
        problems.append(f"only in the second: {_names(only_b)}")
    pairs = [p for p in pairs if p not in shape_mismatch]
    return pairs, problems


def _anatomy_key(anatomy: Anatomy, name: str) -> tuple | None:
    e = anatomy.entries[name]
    if e.role in ("other", "unknown"):
        return None
    return (e.role, e.stack, e.layer, e.expert, name.rsplit(".", 1)[-1])


def _unique_keys(anatomy: Anatomy, names: list[str]) -> dict[tuple, str]:
    keys: dict[tuple, list[str]] = {}
    for n in names:
        k = _anatomy_key(anatomy, n)
        if k is not None:
            keys.setdefault(k, []).append(n)
    return {k: v[0] for k, v in keys.items() if len(v) == 1}


def _names(names: list[str], limit: int = 6) -> str:
    head = ", ".join(names[:limit])
    return f"{head} and {len(names) - limit} more" if len(names) > limit else head


# -- drift of matched tensors -------------------------------------------------------------------
def drift_rows(a: Model, b: Model, pairs: list[tuple[str, str]], store: Store, *, procrustes: bool = True,
               slices: bool = True, use_cache: bool = True, progress: Progress | None = None) -> list[dict[str, Any]]:
    """One row per matrix (fused tensors also per q/k/v slice): drift from ``a`` to ``b``."""
    from ..pipeline import _derived_hash, read_with_hash

    params = json.dumps({"procrustes": procrustes, "v": DRIFT_VERSION})
    rows: list[dict[str, Any]] = []
    for done, (na, nb) in enumerate(pairs, 1):
        entry = a.anatomy.entries[na]
        parts = a.anatomy.parts(na, slices) or []
        row_base = {"name": na, "layer": entry.layer, "role": entry.role, "shape": shape_text(entry.shape)}
        try:
            ta, ha = read_with_hash(a.source, store, na, use_cache)
            tb, hb = read_with_hash(b.source, store, nb, use_cache)
            if not parts:  # 1-D tensors (norms, biases) and 3-D stacks still get rel_change and cosine
                parts = [Part("", entry.role, entry.expert)]
            for part in parts:
                key_a = ha if not part.suffix else _derived_hash(ha, part.key)
                key_b = hb if not part.suffix else _derived_hash(hb, part.key)
                cached = store.artifact(f"{key_a}>{key_b}", "drift", params) if use_cache else None
                if cached is None:
                    ta = _loaded(ta, a.source, store, na)
                    tb = _loaded(tb, b.source, store, nb)
                    cached = _finite_or_none(matrix_drift(part.apply(ta), part.apply(tb), procrustes))
                    store.put_artifact(f"{key_a}>{key_b}", "drift", params, cached)
                name = f"{na}[{part.suffix}]" if part.suffix else na
                rows.append({**row_base, "name": name, "role": part.role,
                             **{c: _nan(cached.get(c)) for c in DRIFT_COLUMNS}, "error": ""})
        except LayerscopeError as exc:
            rows.append({**row_base, **{c: math.nan for c in DRIFT_COLUMNS}, "error": f"unreadable: {exc}"})
        except ValueError as exc:
            rows.append({**row_base, **{c: math.nan for c in DRIFT_COLUMNS}, "error": str(exc)})
        if progress:
            progress(done, len(pairs), na)
    return rows


def _loaded(tensor: Any, source: Source, store: Store, name: str) -> Any:
    """``tensor``, or the tensor read now when ``read_with_hash`` only had to name its hash."""
    from ..pipeline import read_with_hash

    return tensor if tensor is not None else read_with_hash(source, store, name, force=True)[0]


def _finite_or_none(values: dict[str, float]) -> dict[str, float | None]:
    return {k: (v if v is not None and math.isfinite(v) else None) for k, v in values.items()}


def _nan(v: Any) -> float:
    return math.nan if v is None else float(v)


# -- the comparison ---------------------------------------------------------------------------------
@dataclass
class CompareResult:
    """``table``: one row per (model, matrix) — drift from the reference and spectral deltas; a matrix
    saved twice under two names (tied ``lm_head``) is one row, the other name in its ``tied`` column.
    ``tokens``: per model, token-embedding drift after Procrustes alignment (decoded).
    ``task_vectors``: with a base, one row per tensor — task-vector norms, cosines, sign conflicts.
    ``mismatch``: what did not match, in words (the matching tensors are still compared).
    ``cka``: with data, one row per (model, layer) — debiased linear CKA between the reference's and the
    model's hidden states on the same tokens (``state`` 0: the embeddings' output; ``layer``: the block
    whose output it is, as in ``table``, whose ``cka`` column repeats it on each of the block's
    matrices); ``data`` names the text. ``cka_data``: per model, the batches it was computed on."""

    reference: str
    models: list[str]
    table: pd.DataFrame
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    task_vectors: pd.DataFrame | None = None
    mismatch: dict[str, list[str]] = field(default_factory=dict)
    cka: pd.DataFrame | None = None
    cka_data: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        """The drift table as .csv/.parquet/.json; a .json file also holds tokens, task vectors, mismatch."""
        from ..views import write_json, write_table

        path = Path(path)
        if path.suffix.lower() != ".json":
            return write_table(self.table, path)
        payload = {
            "reference": self.reference, "models": self.models, "mismatch": self.mismatch,
            "drift": json.loads(self.table.to_json(orient="records")),
            "tokens": self.tokens,
            "task_vectors": json.loads(self.task_vectors.to_json(orient="records")) if self.task_vectors is not None else None,
            "cka": json.loads(self.cka.to_json(orient="records")) if self.cka is not None else None,
            "cka_data": self.cka_data,
        }
        return write_json(payload, path)


def compare(*models: Any, base: Any = None, config: Config | None = None, top_k: int = 50,
            procrustes: bool = True, spectral: bool = True, keep: float = 0.2,
            progress: Progress | None = None, data: Any = None, text_field: str | None = None,
            seq_len: int | None = None, batches: int = 4, batch_size: int = 8, model_dtype: str | None = None,
            stored_cka: bool = False, **overrides: Any) -> CompareResult:
    """Compare checkpoints. ``compare(a, b)``: drift from ``a`` to ``b`` (and to any further model).
    ``compare(x, y, base=b)``: drift from ``b`` to each model, plus the task vectors ``model − b``
    (their norms, cosines and sign conflicts, before and after TIES-style trimming to ``keep``).

    ``data`` (a path, a list of texts, or ``True`` for the default text): also run the reference and
    each model on the same token batches (``text_field``, ``seq_len``, ``batches``, ``batch_size``,
    ``config.seed``, ``config.device``, ``model_dtype`` as for ``activations``) and add the per-layer
    debiased linear CKA between them (``cka``; probes/layer_cka.py). ``stored_cka``: without data,
    show the CKA already in the store for each pair (what ``report`` does)."""
    config = (config or Config()).replace(**overrides)
    if not 0 < keep <= 1:
        raise LayerscopeError(f"keep (--trim) must lie in (0, 1], got {keep}")
    if len(models) < (1 if base is not None else 2):
        raise LayerscopeError("compare needs two checkpoints (A B), or a base and at least one fine-tune")
    specs = ([base] if base is not None else []) + list(models)
    opened = [Model.open(s) for s in specs]
    for m, label in zip(opened, unique_labels([m.label for m in opened])):
        m.label = label
    ref, targets = opened[0], opened[1:]
    if data is not None:  # CKA on data: refuse what cannot work before any drift is computed
        _check_same_vocabulary(ref, targets)
    rows: list[dict[str, Any]] = []
    tokens: dict[str, dict[str, Any]] = {}
    mismatch: dict[str, list[str]] = {}
    matched: dict[str, list[tuple[str, str]]] = {}
    with Store(config.resolved_store()) as store:
        for target in targets:
            pairs, problems = match_tensors(ref.anatomy, target.anatomy)
            if problems:
                mismatch[target.label] = problems
            if not pairs:
                raise LayerscopeError(f"{ref.label} and {target.label} have no tensor in common: {'; '.join(problems)}")
            matched[target.label] = pairs
            target_rows = drift_rows(ref, target, pairs, store, procrustes=procrustes, slices=config.slices,
                                     use_cache=config.cache, progress=progress)
            for row in merge_tied(target_rows, tied_pairs(ref, target, pairs, store, config.cache)):
                rows.append({"model": target.label, **row})
            tok = _token_drift(ref, target, pairs, store, top_k, config.cache)
            if tok is not None:
                tokens[target.label] = tok
        task_table = _task_vectors(ref, targets, matched, keep) if base is not None else None
        data_options = dict(text_field=text_field, seq_len=seq_len, batches=batches, batch_size=batch_size,
                            seed=config.seed, device=config.device, dtype=model_dtype)
        cka = _layer_cka(ref, targets, None if data is True else data, store, config, data_options, progress) \
            if data is not None or stored_cka else {}
    table = pd.DataFrame(rows)
    table["layer"] = table["layer"].astype("Int64")
    if spectral:
        table = _with_spectral_deltas(table, ref, targets, matched, config)
    cka_table = _cka_table(cka) if cka else None
    if cka_table is not None:
        table = _with_cka_column(table, cka)
    return CompareResult(ref.label, [t.label for t in targets], table, tokens, task_table, mismatch, cka_table,
                         {label: [r.data for r in results] for label, results in cka.items()})


# -- CKA on data (probes/layer_cka.py) ------------------------------------------------------------
def _layer_cka(ref: Model, targets: list[Model], data: Any, store: Store, config: Config, options: dict[str, Any],
               progress: Progress | None) -> dict[str, list[Any]]:
    """{target label: [LayerCKA]}: computed on ``data`` (one), or, with ``data`` None, those stored."""
    from ..probes.layer_cka import layer_cka, stored_layer_cka

    out: dict[str, list[Any]] = {}
    for target in targets:
        if data is None:
            try:
                found = stored_layer_cka(ref.source, target.source, store)
            except LayerscopeError:  # an unreadable tensor has no weights hash: nothing stored to show
                found = []
        else:
            found = [layer_cka(ref.source, target.source, data, store=store, cache=config.cache, progress=progress,
                               **options)]
        if found:
            out[target.label] = found
    return out


def _check_same_vocabulary(ref: Model, targets: list[Model]) -> None:
    """CKA pairs token i of A with token i of B: different vocabularies cannot read the same tokens.
    (Same-size vocabularies that tokenise differently are found by layer_cka from the tokens.)"""
    for t in targets:
        va, vb = ref.anatomy.dims.vocab_size, t.anatomy.dims.vocab_size
        if va and vb and va != vb:
            raise LayerscopeError(f"CKA on data needs one tokenizer: {ref.label} has a {va}-token vocabulary and "
                                  f"{t.label} a {vb}-token one")


def _cka_table(cka: dict[str, list[Any]]) -> pd.DataFrame:
    frames = [r.rows.assign(model=label, data=r.data.get("description", "")) for label, results in cka.items()
              for r in results]
    table = pd.concat(frames, ignore_index=True)
    return table[["model", "data", "state", "layer", "cka"]]


def _with_cka_column(table: pd.DataFrame, cka: dict[str, list[Any]]) -> pd.DataFrame:
    """``cka`` on each matrix row: the CKA of its block's output (one dataset only; NaN outside blocks)."""
    table = table.copy()
    table["cka"] = math.nan
    for label, results in cka.items():
        if len(results) != 1:  # several stored datasets: the per-layer table has them all
            continue
        by_layer = {int(r.layer): float(r.cka) for r in results[0].rows.itertuples() if not pd.isna(r.layer)}
        rows = table["model"] == label
        table.loc[rows, "cka"] = [by_layer.get(int(v), math.nan) if not pd.isna(v) else math.nan
                                  for v in table.loc[rows, "layer"]]
    return table


def tied_pairs(a: Model, b: Model, pairs: list[tuple[str, str]], store: Store, use_cache: bool = True) -> dict[str, str]:
    """{lm_head name: token embedding name} when the two are one matrix (equal content) in both
    checkpoints — nanoGPT and GPT-2 save the tied ``lm_head.weight`` beside ``wte.weight``. Their
    drift rows would be two identical rows; :func:`merge_tied` keeps one, marked ``tied``."""
    from ..pipeline import read_with_hash

    names = dict(pairs)
    embeds = [e.name for e in a.anatomy.by_role("embed.token") if e.name in names]
    heads = [e.name for e in a.anatomy.by_role("lm_head") if e.name in names]
    tied: dict[str, str] = {}
    try:
        hashes = {n: (read_with_hash(a.source, store, n, use_cache)[1], read_with_hash(b.source, store, names[n], use_cache)[1])
                  for n in embeds + heads}
    except LayerscopeError:  # an unreadable tensor: its row already says so, and nothing is merged
        return tied
    for head in heads:
        twin = next((e for e in embeds if hashes[e] == hashes[head]), None)
        if twin is not None:
            tied[head] = twin
    return tied


def merge_tied(rows: list[dict[str, Any]], tied: dict[str, str]) -> list[dict[str, Any]]:
    """Drop the rows of each tied copy (see :func:`tied_pairs`); the kept row's ``tied`` column names it."""
    twins: dict[str, list[str]] = {}
    for copy, kept in tied.items():
        twins.setdefault(kept, []).append(copy)
    out = []
    for row in rows:
        if row["name"].partition("[")[0] in tied:
            continue
        out.append({**row, "tied": ", ".join(twins.get(row["name"].partition("[")[0], []))})
    return out


def _token_drift(ref: Model, target: Model, pairs: list[tuple[str, str]], store: Store, top_k: int,
                 use_cache: bool) -> dict[str, Any] | None:
    names = dict(pairs)
    embed = next((e.name for e in ref.anatomy.by_role("embed.token") if len(e.shape) == 2 and e.name in names), None)
    if embed is None:
        return None
    from ..pipeline import read_with_hash

    # as in drift_rows: known files give their hashes from the fingerprints, unread
    ta, ha = read_with_hash(ref.source, store, embed, use_cache)
    tb, hb = read_with_hash(target.source, store, names[embed], use_cache)
    params = json.dumps({"top_k": top_k, "v": DRIFT_VERSION})
    result = store.artifact(f"{ha}>{hb}", "token_drift", params) if use_cache else None
    if result is None:
        result = token_drift(_loaded(ta, ref.source, store, embed), _loaded(tb, target.source, store, names[embed]), top_k)
        result.pop("per_token_cosine")
        store.put_artifact(f"{ha}>{hb}", "token_drift", params, result)
    vocab = Vocabulary.of(target.source if target.source.tokenizer_file else ref.source, target.anatomy)
    for key in ("most_drifted", "least_drifted"):
        for tok in result[key]:
            tok["text"] = vocab.text(tok["id"])
    return {"name": embed, **result}


def _task_vectors(base: Model, targets: list[Model], matched: dict[str, list[tuple[str, str]]],
                  keep: float) -> pd.DataFrame:
    common = set.intersection(*(set(x for x, _ in pairs) for pairs in matched.values()))
    rows = []
    for name in (n for n in base.anatomy.entries if n in common):
        entry = base.anatomy.entries[name]
        row: dict[str, Any] = {"name": name, "layer": entry.layer, "role": entry.role, "shape": shape_text(entry.shape)}
        try:
            models = {t.label: t.source.read(dict(matched[t.label])[name])[0] for t in targets}
            row.update(task_vector_stats(base.source.read(name)[0], models, keep))
            row["error"] = ""
        except LayerscopeError as exc:
            row["error"] = f"unreadable: {exc}"
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        table["layer"] = table["layer"].astype("Int64")
    return table


def _with_spectral_deltas(table: pd.DataFrame, ref: Model, targets: list[Model],
                          matched: dict[str, list[tuple[str, str]]], config: Config) -> pd.DataFrame:
    """Add ``delta_<metric>`` (target − reference) for every spectral metric, from the store."""
    from ..weights.metrics import select_metrics
    from ..pipeline import analyze

    spectral = [m.name for m in select_metrics(config) if m.group == "spectral"]
    if not spectral:
        return table
    metric_config = config.replace(metrics=tuple(spectral))
    ref_table = analyze(ref.source, metric_config).table.set_index("name")
    frames = []
    for target in targets:
        tgt_table = analyze(target.source, metric_config).table.set_index("name")
        to_target = dict(matched[target.label])
        part = table[table["model"] == target.label].copy()
        names = [(n, target_row_name(n, to_target)) for n in part["name"]]
        for metric in spectral:
            part[f"delta_{metric}"] = [_delta(ref_table, tgt_table, a, b, metric) for a, b in names]
        frames.append(part)
    return pd.concat(frames, ignore_index=True)


def target_row_name(row_name: str, to_target: dict[str, str]) -> str:
    """The target's row name for a reference row name (``name`` or ``name[slice]``)."""
    base, bracket, suffix = row_name.partition("[")
    return to_target.get(base, base) + bracket + suffix


def _delta(ref: pd.DataFrame, tgt: pd.DataFrame, ref_name: str, tgt_name: str, metric: str) -> float:
    try:
        after, before = float(tgt.at[tgt_name, metric]), float(ref.at[ref_name, metric])
    except (KeyError, TypeError, ValueError):
        return math.nan
    if math.isinf(after) and math.isinf(before):
        return math.nan if after == before else after - before
    return after - before
