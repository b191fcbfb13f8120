"""MLP down-projection spectra per layer: cumulative explained variance and condition number.

The singular values come from the store when ``analyze`` has seen the matrix (spectra are stored
by content hash), otherwise they are computed once and stored.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..anatomy import build_anatomy
from ..config import Config
from ..errors import LayerscopeError
from .metrics import all_metrics
from .metrics.spectral import condition_number
from ..pipeline import read_with_hash
from ..sources import open_source
from .spectrum import Spectrum, singular_values, spectrum_record, stored_spectrum
from ..store import Store


def mlp_down_spectra(source: Any, config: Config | None = None, *, revision: str | None = None,
                     **overrides: Any) -> pd.DataFrame:
    """One row per layer: name, condition_number and the curve Σ_{i≤k}σ_i²/Σσ² (``explained_variance``)."""
    config = (config or Config()).replace(**overrides)
    src = open_source(source, revision)
    anatomy = build_anatomy(src.infos, src.config)
    downs = sorted((e for e in anatomy.entries.values() if e.role == "mlp.down" and len(e.shape) == 2),
                   key=lambda e: (e.layer if e.layer is not None else -1))
    if not downs:
        raise LayerscopeError(f"{src.label}: no MLP down-projection matrices found (role mlp.down)")
    cond = all_metrics(config)["condition_number"]

    def certify(spec: Spectrum) -> bool:  # the explained-variance curve is a figure; its error is ≤ 2·rel_err
        return cond.certified(spec)

    rows = []
    with Store(config.resolved_store()) as store:
        for e in downs:
            tensor, digest = read_with_hash(src, store, e.name, config.cache)
            spec = stored_spectrum(store, digest, config.dtype, tuple(e.shape)) if config.cache else None
            if spec is None or not certify(spec):
                if tensor is None:
                    tensor, _ = read_with_hash(src, store, e.name, config.cache, force=True)
                spec = singular_values(tensor, config.dtype, config.device, certify=certify)
                store.put(digest, {}, spectrum_record(spec, config.dtype))
            energy = np.cumsum(np.asarray(spec.sv, dtype=np.float64) ** 2)
            rows.append({"layer": e.layer, "name": e.name, "condition_number": condition_number(spec, config.rank_tol),
                         "explained_variance": energy / energy[-1]})
    return pd.DataFrame(rows)
