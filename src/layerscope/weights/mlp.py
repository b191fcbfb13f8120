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
from .metrics.spectral import condition_number
from ..pipeline import read_with_hash
from ..sources import open_source
from .spectrum import Spectrum, singular_values
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
    rows = []
    with Store(config.resolved_store()) as store:
        for e in downs:
            tensor, digest = read_with_hash(src, store, e.name, config.cache)
            sv = store.spectrum(digest, config.dtype) if config.cache else None
            if sv is None:
                if tensor is None:
                    tensor, _ = read_with_hash(src, store, e.name, config.cache, force=True)
                sv, _ = singular_values(tensor, config.dtype, config.device)
                store.put(digest, {}, (config.dtype, sv))
            energy = np.cumsum(np.asarray(sv, dtype=np.float64) ** 2)
            spec = Spectrum(np.asarray(sv), tuple(e.shape), "stored")
            rows.append({"layer": e.layer, "name": e.name, "condition_number": condition_number(spec, config.rank_tol),
                         "explained_variance": energy / energy[-1]})
    return pd.DataFrame(rows)
