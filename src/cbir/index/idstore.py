"""Index id → image path, label and metadata, in SQLite (the standard library's embedded database).

A saved store is one SQLite file per index generation (``ids-<generation>.sqlite``, see
:mod:`cbir.index.store`), opened read-only and immutable: a search looks its hits up by primary key, so the
process's memory does not grow with the collection (the JSON-lines store it replaces was loaded into a dict,
≈ 500 B per image). The first change (``add``/``remove``) copies the store into an in-memory database, where
changes are transactions; ``save`` writes that database to a new file with SQLite's backup API (temp file +
rename, as every cbir file). Stores of older indexes (``ids*.jsonl``) load through :meth:`IdStore.load` and
are written as SQLite by the next save.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np

from cbir.index.errors import IndexFilesError
from cbir.io import atomic_path

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,      -- the FAISS id
    path TEXT NOT NULL,          -- absolute file path, or <dataset>:<array>/<row>
    label TEXT,
    meta TEXT,                   -- JSON object
    added_at REAL                -- unix time
);
CREATE INDEX IF NOT EXISTS images_path ON images(path);
"""
CHUNK = 900  # ids per IN (...) query: under SQLite's default limit of 999 bound variables


class IdStore:
    """Rows ``{"id", "path", "label", "meta"}`` keyed by id. Thread-safe (one lock around the connection)."""

    def __init__(self, connection: sqlite3.Connection | None = None, next_id: int = 0,
                 writable: bool = True) -> None:
        if connection is None:
            connection = _memory_database()
        self._db = connection
        self._writable = writable
        self._lock = threading.RLock()
        self._count: int | None = None
        self.next_id = int(next_id)

    # -- reading ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        if self._count is None:
            self._count = int(self._one("SELECT COUNT(*) FROM images")[0])
        return self._count

    def lookup(self, ids: Iterable[int]) -> list[dict | None]:
        """The rows of ``ids`` in their order (None for -1 or an id the store does not hold)."""
        ids = [int(i) for i in ids]
        found: dict[int, dict] = {}
        wanted = sorted({i for i in ids if i >= 0})
        for chunk in _chunks(wanted):
            for row in self._all(f"SELECT id, path, label, meta FROM images WHERE id IN ({_marks(chunk)})", chunk):
                found[row[0]] = _row(row)
        return [found.get(i) for i in ids]

    def ids_of_paths(self, paths: Iterable[str]) -> np.ndarray:
        wanted = sorted({str(p) for p in paths})
        ids: list[int] = []
        for chunk in _chunks(wanted):
            ids += [r[0] for r in self._all(f"SELECT id FROM images WHERE path IN ({_marks(chunk)})", chunk)]
        return np.array(sorted(ids), dtype=np.int64)

    def paths(self) -> set[str]:
        return {r[0] for r in self._all("SELECT path FROM images")}

    def ids(self) -> np.ndarray:
        return np.array([r[0] for r in self._all("SELECT id FROM images ORDER BY id")], dtype=np.int64)

    def unknown_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        held: set[int] = set()
        for chunk in _chunks(sorted(set(ids))):
            held |= {r[0] for r in self._all(f"SELECT id FROM images WHERE id IN ({_marks(chunk)})", chunk)}
        return [i for i in ids if i not in held]

    def labelled(self) -> bool:
        return self._one("SELECT 1 FROM images WHERE label IS NOT NULL LIMIT 1") is not None

    def first_id(self) -> int | None:
        row = self._one("SELECT id FROM images ORDER BY id LIMIT 1")
        return None if row is None else int(row[0])

    def id_labels(self) -> Iterator[tuple[int, str | None]]:
        """(id, label) of every row, in id order (label filters scan this once per filter)."""
        yield from self._all("SELECT id, label FROM images ORDER BY id")

    @property
    def rows(self) -> dict[int, dict]:
        """Every row by id, read into memory: for tests and small stores (searching never needs it)."""
        return {r[0]: _row(r) for r in self._all("SELECT id, path, label, meta FROM images ORDER BY id")}

    # -- changing -----------------------------------------------------------------------------------
    def add(self, paths: Sequence[str], labels: Sequence[str | None] | None = None,
            metadata: Sequence[dict | None] | None = None) -> np.ndarray:
        """New ids for ``paths`` (one transaction)."""
        labels = labels if labels is not None else [None] * len(paths)
        metadata = metadata if metadata is not None else [None] * len(paths)
        if not len(labels) == len(metadata) == len(paths):
            raise ValueError("paths, labels and metadata must have the same length")
        ids = np.arange(self.next_id, self.next_id + len(paths), dtype=np.int64)
        now = time.time()
        rows = [(int(i), str(path), None if label is None else str(label), json.dumps(meta or {}, ensure_ascii=False),
                 now) for i, path, label, meta in zip(ids.tolist(), paths, labels, metadata)]
        with self._lock:
            self._make_writable()
            with self._db:
                self._db.executemany("INSERT INTO images (id, path, label, meta, added_at) VALUES (?, ?, ?, ?, ?)",
                                     rows)
            self._count = None
        self.next_id += len(paths)
        return ids

    def remove(self, ids: Iterable[int]) -> None:
        ids = sorted({int(i) for i in ids})
        with self._lock:
            self._make_writable()
            with self._db:
                for chunk in _chunks(ids):
                    self._db.execute(f"DELETE FROM images WHERE id IN ({_marks(chunk)})", chunk)
            self._count = None

    def _make_writable(self) -> None:
        """A store opened from a file is read-only: its first change copies it into memory."""
        if not self._writable:
            memory = sqlite3.connect(":memory:", check_same_thread=False)
            self._db.backup(memory)
            self._db.close()
            self._db, self._writable = memory, True

    # -- files --------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the store to ``path`` (a new SQLite file, complete before it appears under that name)."""
        with atomic_path(path) as temp:
            target = sqlite3.connect(str(temp))
            try:
                with self._lock:
                    self._db.backup(target)
            finally:
                target.close()

    @classmethod
    def load(cls, path: str | Path, next_id: int = 0) -> IdStore:
        """The store in ``path``: SQLite (opened read-only), or the JSON lines of an older index."""
        path = Path(path)
        if path.suffix == ".jsonl":
            store = cls._from_jsonl(path)
        else:
            try:
                uri = f"file:{quote(str(path.resolve()))}?mode=ro&immutable=1"  # immutable: a generation never changes
                connection = sqlite3.connect(uri, uri=True, check_same_thread=False)
                connection.execute("SELECT id, path, label, meta FROM images LIMIT 1").fetchall()
            except sqlite3.DatabaseError as exc:
                raise IndexFilesError(f"{path}: not a cbir id store ({exc}); rebuild the index") from None
            store = cls(connection, writable=False)
        last = store._one("SELECT MAX(id) FROM images")[0]
        store.next_id = max(int(next_id), 0 if last is None else int(last) + 1)
        return store

    @classmethod
    def _from_jsonl(cls, path: Path) -> IdStore:
        """An index saved before the SQLite store: its ``ids*.jsonl``, converted in memory."""
        store = cls()
        rows = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    rows.append((int(row["id"]), str(row["path"]), row.get("label"),
                                 json.dumps(row.get("meta") or {}, ensure_ascii=False), None))
                except (ValueError, KeyError, TypeError):
                    raise IndexFilesError(f"{path}: line {line_no} is not an id record; rebuild the index") from None
        with store._db:
            store._db.executemany("INSERT OR REPLACE INTO images (id, path, label, meta, added_at) "
                                  "VALUES (?, ?, ?, ?, ?)", rows)
        return store

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- helpers ------------------------------------------------------------------------------------
    def _all(self, sql: str, args: Sequence = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def _one(self, sql: str, args: Sequence = ()) -> tuple | None:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchone()


def _memory_database() -> sqlite3.Connection:
    connection = sqlite3.connect(":memory:", check_same_thread=False)
    connection.executescript(SCHEMA)
    return connection


def _row(row: tuple) -> dict:
    image_id, path, label, meta = row
    return {"id": int(image_id), "path": path, "label": label, "meta": json.loads(meta) if meta else {}}


def _marks(values: Sequence) -> str:
    return ",".join("?" * len(values))


def _chunks(values: Sequence, size: int = CHUNK) -> Iterator[list]:
    for start in range(0, len(values), size):
        yield list(values[start:start + size])
