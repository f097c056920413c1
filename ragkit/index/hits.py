"""Search results: `Hit`s whose passages are read from the segments' stores on first access, in one batch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ragkit.index.segments import Segment


class Hit:
    """One search result. Built by a search, its id, title, text and metadata are read from the passage
    store on first access, for every hit of that search at once (one batched read), so a caller that
    only needs scores pays nothing for texts."""

    __slots__ = ("score", "rank", "ranks", "_vid", "_lookup", "_id", "_title", "_text", "_metadata")

    def __init__(self, id: str, score: float, rank: int, title: str = "", text: str = "",
                 metadata: dict[str, Any] | None = None, ranks: dict[str, int | None] | None = None) -> None:
        self.score, self.rank = score, rank
        self.ranks = ranks  # a fused (hybrid) hit: its rank on each side, None where that side missed it
        self._id, self._title, self._text, self._metadata = id, title, text, metadata or {}
        self._lookup: PassageLookup | None = None
        self._vid = -1

    @classmethod
    def _lazy(cls, lookup: "PassageLookup", vid: int, score: float, rank: int) -> "Hit":
        hit = cls.__new__(cls)
        hit.score, hit.rank, hit._vid, hit._lookup, hit.ranks = score, rank, vid, lookup, None
        return hit

    def _resolved(self) -> "Hit":
        """This hit with its passage fields read (for every hit of its search at once)."""
        if self._lookup is not None:
            row = self._lookup.row(self._vid)
            self._id, self._title, self._text, self._metadata = row["id"], row["title"], row["text"], row["metadata"]
            self._lookup = None
        return self

    @property
    def id(self) -> str:
        return self._resolved()._id

    @property
    def title(self) -> str:
        return self._resolved()._title

    @property
    def text(self) -> str:
        return self._resolved()._text

    @property
    def metadata(self) -> dict[str, Any]:
        return self._resolved()._metadata

    def to_json(self) -> dict[str, Any]:
        out = {"id": self.id, "score": self.score, "rank": self.rank, "title": self.title, "text": self.text}
        if self.metadata:
            out["metadata"] = self.metadata
        if self.ranks is not None:
            out["ranks"] = dict(self.ranks)
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Hit) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return f"Hit(id={self.id!r}, score={self.score:.4f}, rank={self.rank})"


def passage_json(passage: Any) -> dict[str, Any]:
    """A stored passage as a hit row shows it (metadata nested, and left out when empty): what
    /passages/{id} returns, from this process's index or a Ray actor's."""
    out = {"id": passage.id, "title": passage.title, "text": passage.text}
    if passage.metadata:
        out["metadata"] = passage.metadata
    return out


class HitRow(Sequence[Hit]):
    """One query's hits, made into `Hit` objects when the row is first read: a search of 1,000 queries
    then costs what Faiss costs plus a few arrays, not 10,000 Python objects nobody may look at."""

    __slots__ = ("_lookup", "_scores", "_vids", "_hits")

    def __init__(self, lookup: "PassageLookup", scores: np.ndarray, vids: np.ndarray) -> None:
        self._lookup, self._scores, self._vids = lookup, scores, vids
        self._hits: list[Hit] | None = None

    def _materialise(self) -> list[Hit]:
        if self._hits is None:
            lookup = self._lookup
            self._hits = [Hit._lazy(lookup, v, s, rank)
                          for rank, (s, v) in enumerate(zip(self._scores.tolist(), self._vids.tolist()), start=1)]
        return self._hits

    def __len__(self) -> int:
        return len(self._vids)

    def __getitem__(self, item: Any) -> Any:
        return self._materialise()[item]

    def __iter__(self) -> Iterator[Hit]:
        return iter(self._materialise())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return repr(self._materialise())


class PassageLookup:
    """The passages of one search's hits, read from their segments' stores together on first use (the
    segments of the version searched, even if the Index has moved on to a newer one since)."""

    def __init__(self, starts: np.ndarray, segments: list[Segment], vids: Any) -> None:
        self.starts, self.segments, self.vids = starts, segments, vids
        self.rows: dict[int, dict[str, Any]] | None = None

    def row(self, vid: int) -> dict[str, Any]:
        if self.rows is None:
            self.rows = fetch_rows(self.starts, self.segments, self.vids)
        return self.rows[vid]


def fetch_rows(starts: np.ndarray, segments: list[Segment], vids: Any, *, ids_only: bool = False) -> dict[int, Any]:
    """vid -> stored row (or id), one batched read per segment."""
    wanted = (np.unique(vids).astype(np.int64) if isinstance(vids, np.ndarray)
              else np.fromiter((int(v) for v in vids), dtype=np.int64))
    out: dict[int, Any] = {}
    if not len(wanted):
        return out
    which = np.searchsorted(starts, wanted, side="right") - 1
    for s in np.unique(which):
        if s < 0:
            continue
        store = segments[s].store
        group = wanted[which == s].tolist()
        out.update(store.fetch_ids(group) if ids_only else store.fetch(group))
    return out
