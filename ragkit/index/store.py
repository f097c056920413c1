"""Passages beside the vectors, in SQLite: one row per passage, keyed by a stable string id.

`vid` is the int64 id the vector carries in Faiss. It comes from AUTOINCREMENT, so it is never reused:
a removed passage's vector (kept as a tombstone where Faiss cannot remove, as in HNSW) can never be
mistaken for a new passage.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ragkit.io.corpus import Passage

SCHEMA = """
CREATE TABLE IF NOT EXISTS passages (
    vid INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tombstones (vid INTEGER PRIMARY KEY);
"""


class PassageStore:
    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        else:
            self.conn = sqlite3.connect(self.path, check_same_thread=False)
            self.conn.executescript(SCHEMA)
            self.conn.commit()

    def close(self) -> None:
        self.conn.close()

    def __len__(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM passages").fetchone()[0])

    def copy_to(self, target: str | Path) -> None:
        """A consistent copy of the whole database (SQLite's online backup)."""
        dest = sqlite3.connect(target)
        try:
            self.conn.backup(dest)
        finally:
            dest.close()

    def vids_for(self, ids: Sequence[str]) -> dict[str, int]:
        return {pid: int(vid) for pid, vid in self._select_in("id, vid", "id", list(ids))}

    def _select_in(self, columns: str, key: str, values: list[Any]) -> Iterator[tuple[Any, ...]]:
        """Rows of `columns` whose `key` is one of `values`, queried 500 at a time (SQLite caps the number
        of bound parameters)."""
        for start in range(0, len(values), 500):
            chunk = values[start : start + 500]
            marks = ",".join("?" * len(chunk))
            yield from self.conn.execute(f"SELECT {columns} FROM passages WHERE {key} IN ({marks})", chunk)

    def insert(self, passages: Iterable[Passage]) -> list[int]:
        """Insert new passages (ids must not exist yet); returns their vids in order."""
        vids = []
        cur = self.conn.cursor()
        for p in passages:
            cur.execute(
                "INSERT INTO passages (id, title, text, metadata) VALUES (?, ?, ?, ?)",
                (p.id, p.title, p.text, json.dumps(p.metadata, ensure_ascii=False)),
            )
            vids.append(int(cur.lastrowid))
        return vids

    def delete(self, vids: Sequence[int], *, tombstone: bool) -> None:
        rows = [(int(v),) for v in vids]
        self.conn.executemany("DELETE FROM passages WHERE vid = ?", rows)
        if tombstone:
            self.conn.executemany("INSERT OR IGNORE INTO tombstones (vid) VALUES (?)", rows)

    def tombstones(self) -> set[int]:
        return {int(r[0]) for r in self.conn.execute("SELECT vid FROM tombstones")}

    def clear_tombstones(self) -> None:
        self.conn.execute("DELETE FROM tombstones")

    def all_vids(self) -> list[int]:
        return [int(r[0]) for r in self.conn.execute("SELECT vid FROM passages ORDER BY vid")]

    def fetch(self, vids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """vid -> {id, title, text, metadata} for the vids that are live."""
        rows = self._select_in("vid, id, title, text, metadata", "vid", list({int(v) for v in vids}))
        return {int(vid): {"id": pid, "title": title, "text": text, "metadata": json.loads(meta)}
                for vid, pid, title, text, meta in rows}

    def fetch_ids(self, vids: Iterable[int]) -> dict[int, str]:
        """vid -> passage id for the vids that are live (the primary-key lookup alone, no text)."""
        return {int(vid): pid for vid, pid in self._select_in("vid, id", "vid", list({int(v) for v in vids}))}

    def iter_passages(self, batch: int = 10_000) -> Iterable[tuple[int, Passage]]:
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
