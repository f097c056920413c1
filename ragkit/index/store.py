"""Passages beside the vectors, in SQLite: one row per passage, keyed by a stable string id.

`vid` is the int64 id the vector carries in Faiss. It comes from AUTOINCREMENT, so it is never reused:
a removed passage's vector (kept as a tombstone where Faiss cannot remove, as in HNSW) can never be
mistaken for a new passage.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
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
        found: dict[str, int] = {}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            marks = ",".join("?" * len(chunk))
            for pid, vid in self.conn.execute(f"SELECT id, vid FROM passages WHERE id IN ({marks})", chunk):
                found[pid] = int(vid)
        return found

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
        wanted = list({int(v) for v in vids})
        out: dict[int, dict[str, Any]] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT vid, id, title, text, metadata FROM passages WHERE vid IN ({marks})"
            for vid, pid, title, text, meta in self.conn.execute(query, chunk):
                out[int(vid)] = {"id": pid, "title": title, "text": text, "metadata": json.loads(meta)}
        return out

    def fetch_ids(self, vids: Iterable[int]) -> dict[int, str]:
        """vid -> passage id for the vids that are live (the primary-key lookup alone, no text)."""
        wanted = list({int(v) for v in vids})
        out: dict[int, str] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for vid, pid in self.conn.execute(f"SELECT vid, id FROM passages WHERE vid IN ({marks})", chunk):
                out[int(vid)] = pid
        return out

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
