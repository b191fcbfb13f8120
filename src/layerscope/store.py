"""The result store: an embedded SQLite database in WAL mode, keyed by tensor content.

Keys are (content hash of the matrix, metric name, metric parameters), so an unchanged tensor is
never recomputed — across runs, across the checkpoints of one training run, across fine-tunes of
one base model. Each tensor's results are committed in one transaction as soon as they exist, so a
run killed at any point (Ctrl-C, kill -9) leaves a readable store and the next run resumes.
Spectra are stored too, so adding a spectral metric later costs no new decomposition.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import LayerscopeError

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    content_hash TEXT NOT NULL, metric TEXT NOT NULL, params TEXT NOT NULL, value,
    PRIMARY KEY (content_hash, metric, params)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS spectra (
    content_hash TEXT NOT NULL, method TEXT NOT NULL, singular_values BLOB NOT NULL,
    PRIMARY KEY (content_hash, method)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS artifacts (
    key TEXT NOT NULL, kind TEXT NOT NULL, params TEXT NOT NULL, payload TEXT NOT NULL,
    PRIMARY KEY (key, kind, params)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS arrays (
    key TEXT NOT NULL, kind TEXT NOT NULL, params TEXT NOT NULL, dtype TEXT NOT NULL, shape TEXT NOT NULL,
    data BLOB NOT NULL, PRIMARY KEY (key, kind, params)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fingerprints (
    fingerprint TEXT PRIMARY KEY, content_hash TEXT NOT NULL) WITHOUT ROWID;
"""

#: Stored in place of NaN, which SQLite would turn into NULL (and NULL means "not computed").
_NAN = "nan"


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise LayerscopeError(f"{self.path}: not a usable layerscope store ({exc})") from None
        except OSError as exc:
            raise LayerscopeError(f"{self.path}: cannot create the store ({exc.strerror or exc})") from None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- content hashes by file identity ------------------------------------------------------
    def hash_for(self, fingerprint: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT content_hash FROM fingerprints WHERE fingerprint=?", (fingerprint,)).fetchone()
        return row[0] if row else None

    def remember_hash(self, fingerprint: str, content_hash: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO fingerprints VALUES (?, ?)", (fingerprint, content_hash))

    # -- metric values --------------------------------------------------------------------------
    def get(self, content_hash: str, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Any]:
        keys = list(keys)
        if not keys:
            return {}
        with self._lock:
            rows = self._db.execute(
                "SELECT metric, params, value FROM results WHERE content_hash=?", (content_hash,)
            ).fetchall()
        wanted = set(keys)
        return {(m, p): (math.nan if v == _NAN else v) for m, p, v in rows if (m, p) in wanted}

    def put(self, content_hash: str, values: dict[tuple[str, str], Any], spectrum: tuple[str, np.ndarray] | None = None) -> None:
        rows = [(content_hash, m, p, _NAN if isinstance(v, float) and math.isnan(v) else v) for (m, p), v in values.items()]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?)", rows)
                if spectrum is not None:
                    method, sv = spectrum
                    self._db.execute("INSERT OR REPLACE INTO spectra VALUES (?, ?, ?)",
                                     (content_hash, method, np.ascontiguousarray(sv, dtype=np.float64).tobytes()))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # -- spectra ------------------------------------------------------------------------------
    def spectrum(self, content_hash: str, method: str) -> np.ndarray | None:
        with self._lock:
            row = self._db.execute("SELECT singular_values FROM spectra WHERE content_hash=? AND method=?",
                                   (content_hash, method)).fetchone()
        return np.frombuffer(row[0], dtype=np.float64).copy() if row else None

    # -- structured results (head tables, embedding geometry, clusters) -----------------------
    def artifact(self, key: str, kind: str, params: str) -> Any | None:
        with self._lock:
            row = self._db.execute("SELECT payload FROM artifacts WHERE key=? AND kind=? AND params=?",
                                   (key, kind, params)).fetchone()
        return json.loads(row[0]) if row else None

    def put_artifact(self, key: str, kind: str, params: str, payload: Any) -> None:
        text = json.dumps(payload, allow_nan=True)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?, ?)", (key, kind, params, text))

    def artifacts(self, key: str, kind: str) -> list[Any]:
        """Every payload stored under ``key`` and ``kind``, ordered by params."""
        with self._lock:
            rows = self._db.execute("SELECT payload FROM artifacts WHERE key=? AND kind=? ORDER BY params",
                                    (key, kind)).fetchall()
        return [json.loads(r[0]) for r in rows]

    # -- arrays (probe results with one value per parameter: a diagonal Fisher, a running sum) -
    def put_arrays(self, key: str, kind: str, arrays: dict[str, np.ndarray]) -> None:
        """Store several named arrays (``params`` = the name) under (key, kind) in one transaction,
        in their own dtype (float32 halves what a per-parameter result costs against float64)."""
        rows = []
        for params, a in arrays.items():
            a = np.ascontiguousarray(a)
            rows.append((key, kind, params, a.dtype.str, json.dumps(list(a.shape)), a.tobytes()))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR REPLACE INTO arrays VALUES (?, ?, ?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def arrays(self, key: str, kind: str) -> dict[str, np.ndarray]:
        """Every array stored under (key, kind), by name ({} when none)."""
        with self._lock:
            rows = self._db.execute("SELECT params, dtype, shape, data FROM arrays WHERE key=? AND kind=?",
                                    (key, kind)).fetchall()
        return {p: np.frombuffer(d, dtype=np.dtype(t)).reshape(json.loads(s)).copy() for p, t, s, d in rows}

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {t: self._db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                    for t in ("results", "spectra", "artifacts", "arrays", "fingerprints")}
