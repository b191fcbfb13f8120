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

TABLES = ("results", "spectra", "artifacts", "arrays", "fingerprints")

#: Rows of each table, as SQLite returns them; how store contents travel between processes.
Records = dict[str, list[tuple]]

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

    # -- moving records between stores (a cluster's workers and the one writing driver) ---------
    def records(self, hashes: Iterable[str], fingerprints: Iterable[str] = ()) -> "Records":
        """Every row about ``hashes`` (results, spectra, artifacts keyed by one hash or by a pair
        ``a>b`` of them) and the given file fingerprints: what a worker needs to skip known work."""
        hashes = set(hashes)
        out: Records = {t: [] for t in TABLES}
        with self._lock:
            for chunk in _chunks(sorted(hashes)):
                marks = ",".join("?" * len(chunk))
                for table in ("results", "spectra"):
                    out[table] += self._db.execute(f"SELECT * FROM {table} WHERE content_hash IN ({marks})", chunk).fetchall()
                rows = self._db.execute(f"SELECT * FROM artifacts WHERE substr(key, 1, 32) IN ({marks})", chunk).fetchall()
                out["artifacts"] += [r for r in rows if r[0] in hashes or all(k in hashes for k in r[0].split(">"))]
            for chunk in _chunks(sorted(set(fingerprints))):
                marks = ",".join("?" * len(chunk))
                out["fingerprints"] += self._db.execute(f"SELECT * FROM fingerprints WHERE fingerprint IN ({marks})",
                                                        chunk).fetchall()
        return out

    def dump(self, exclude: "Records | None" = None) -> "Records":
        """Every row of every table (minus those in ``exclude``): what a worker's store learned."""
        with self._lock:
            out = {t: self._db.execute(f"SELECT * FROM {t}").fetchall() for t in TABLES}
        if exclude:
            for t in TABLES:
                seen = set(exclude.get(t, ()))
                out[t] = [r for r in out[t] if r not in seen]
        return out

    def merge(self, records: "Records") -> None:
        """Write ``records`` (from ``records``/``dump`` of another store) in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for t in TABLES:
                    rows = records.get(t) or []
                    if rows:
                        marks = ",".join("?" * len(rows[0]))
                        self._db.executemany(f"INSERT OR REPLACE INTO {t} VALUES ({marks})", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

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
                    for t in TABLES}


def _chunks(items: list[str], size: int = 500) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
