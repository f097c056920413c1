"""Passages beside the vectors, in SQLite: one row per passage, keyed by a stable string id.

Each segment of an index has its own store (see `ragkit.index.segments`). `vid` is the int64 id the vector
carries in Faiss; the index hands out vids from a counter kept in its manifest, so a vid is never reused
and a removed passage's vector can never be mistaken for a new passage.

Format-1 stores (one store per index, vids from AUTOINCREMENT, a `tombstones` table) are still read.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragkit.io.corpus import Passage

if TYPE_CHECKING:
    import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS passages (
    vid INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL
);
"""


class DuplicateIdError(Exception):
    """An insert met an id that the store already holds."""

    def __init__(self, passage_id: str, position: int) -> None:
        super().__init__(passage_id)
        self.passage_id, self.position = passage_id, position


class PassageStore:
    def __init__(self, path: str | Path, *, readonly: bool = False, bulk: bool = False) -> None:
        """bulk: a store being written inside a staging folder, fsynced when it is published, so SQLite's
        own journal and syncs would only slow the load down."""
        self.path = Path(path)
        if readonly:
            self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        else:
            self.conn = sqlite3.connect(self.path, check_same_thread=False)
            if bulk:
                self.conn.execute("PRAGMA journal_mode=OFF")
                self.conn.execute("PRAGMA synchronous=OFF")
            self.conn.executescript(SCHEMA)
            self.conn.commit()

    def close(self) -> None:
        self.conn.close()

    def __len__(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM passages").fetchone()[0])

    def vids_for(self, ids: Sequence[str]) -> dict[str, int]:
        return {pid: int(vid) for pid, vid in self._select_in("id, vid", "id", list(ids))}

    def _select_in(self, columns: str, key: str, values: list[Any]) -> Iterator[tuple[Any, ...]]:
        """Rows of `columns` whose `key` is one of `values`, queried 500 at a time (SQLite caps the number
        of bound parameters)."""
        for start in range(0, len(values), 500):
            chunk = values[start : start + 500]
            marks = ",".join("?" * len(chunk))
            yield from self.conn.execute(f"SELECT {columns} FROM passages WHERE {key} IN ({marks})", chunk)

    def insert(self, passages: Sequence[Passage], vids: Sequence[int]) -> None:
        """Insert new passages with their vids; an id already stored raises DuplicateIdError (the
        position is the passage's index in `passages`)."""
        rows = [(int(v), p.id, p.title, p.text, json.dumps(p.metadata, ensure_ascii=False)) for p, v in zip(passages, vids)]
        try:
            self.conn.executemany("INSERT INTO passages (vid, id, title, text, metadata) VALUES (?, ?, ?, ?, ?)", rows)
        except sqlite3.IntegrityError:
            self.conn.rollback()
            seen: set[str] = set()
            for i, p in enumerate(passages):
                if p.id in seen or self.conn.execute("SELECT 1 FROM passages WHERE id = ?", (p.id,)).fetchone():
                    raise DuplicateIdError(p.id, i) from None
                seen.add(p.id)
            raise

    def legacy_tombstones(self) -> set[int]:
        """The dead vids of a format-1 store (its `tombstones` table); empty for segment stores."""
        has = self.conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='tombstones'").fetchone()
        return {int(r[0]) for r in self.conn.execute("SELECT vid FROM tombstones")} if has else set()

    def all_vids(self) -> "np.ndarray":
        import numpy as np

        return np.fromiter((r[0] for r in self.conn.execute("SELECT vid FROM passages ORDER BY vid")), dtype=np.int64)

    def fetch(self, vids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """vid -> {id, title, text, metadata} for the vids the store holds."""
        rows = self._select_in("vid, id, title, text, metadata", "vid", list({int(v) for v in vids}))
        return {int(vid): {"id": pid, "title": title, "text": text, "metadata": json.loads(meta)}
                for vid, pid, title, text, meta in rows}

    def fetch_ids(self, vids: Iterable[int]) -> dict[int, str]:
        """vid -> passage id (the primary-key lookup alone, no text)."""
        return {int(vid): pid for vid, pid in self._select_in("vid, id", "vid", list({int(v) for v in vids}))}

    def iter_passages(self, batch: int = 10_000) -> Iterator[tuple[int, Passage]]:
        last = -1
        while True:
            rows = self.conn.execute(
                "SELECT vid, id, title, text, metadata FROM passages WHERE vid > ? ORDER BY vid LIMIT ?", (last, batch)
            ).fetchall()
            if not rows:
                return
            for vid, pid, title, text, meta in rows:
                yield int(vid), Passage(pid, text, title, json.loads(meta))
            last = int(rows[-1][0])

    def commit(self) -> None:
        self.conn.commit()


def copy_live_rows(target: PassageStore, sources: Sequence[Path], dead: Sequence[int]) -> int:
    """Copy every row of the source stores whose vid is not in `dead` into `target`, inside SQLite
    (ATTACH + INSERT ... SELECT), so compaction never turns a million passages into Python objects."""
    conn = target.conn
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS dead (vid INTEGER PRIMARY KEY)")
    conn.execute("DELETE FROM dead")
    conn.executemany("INSERT OR IGNORE INTO dead (vid) VALUES (?)", [(int(v),) for v in dead])
    for source in sources:
        conn.execute("ATTACH DATABASE ? AS src", (str(source),))
        try:
            conn.execute("INSERT INTO passages (vid, id, title, text, metadata) SELECT vid, id, title, text, metadata "
                         "FROM src.passages WHERE vid NOT IN (SELECT vid FROM dead) ORDER BY vid")
            conn.commit()
        finally:
            conn.execute("DETACH DATABASE src")
    conn.execute("DROP TABLE dead")
    return len(target)
