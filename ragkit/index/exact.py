"""Exact vectors kept on disk beside compressed codes, for re-ranking (`ivf-pq:...,refine=R`).

PQ codes lose recall (at 768 dims and 64-96 bytes a vector, recall@10 tops out near 0.6-0.9 however many
lists are probed). Keeping every vector in RAM to re-rank (Faiss' IndexRefineFlat) costs 4·d bytes a vector:
64 GB at 21M x 768. Here the vectors stay on disk, memory-mapped, and only the R candidates of each query are
read and scored exactly, so recall costs disk (2·d bytes a vector in float16), not RAM. No library keeps the
refinement vectors on disk, hence this module.

A segment's exact vectors are one or more parts, each a run of consecutive vids stored row by row in a file:
    {"file": "seg-000001.exact-00000.npy", "first_vid": 1, "rows": 2625000, "dtype": "float16", "offset": 128}
Built from embedding shards, the parts are the shards' own .npy files, hard-linked into the index (no bytes
copied when they are on the same file system); otherwise they are written while the segment is built.
A compaction keeps the merged segments' parts as they are (rows of removed passages are never looked up).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ExactPart:
    file: str
    first_vid: int
    rows: int
    dtype: str
    offset: int

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "first_vid": self.first_vid, "rows": self.rows, "dtype": self.dtype,
                "offset": self.offset}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ExactPart":
        return cls(str(obj["file"]), int(obj["first_vid"]), int(obj["rows"]), str(obj["dtype"]), int(obj["offset"]))


def npy_part(path: Path, name: str, first_vid: int) -> ExactPart:
    """Describe a whole .npy file of vectors (rows in vid order from `first_vid`) as a part."""
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    return ExactPart(name, first_vid, int(array.shape[0]), str(array.dtype), int(array.offset))


class ExactVectors:
    """Every part of an index version, memory-mapped on first use; `rows(vids)` reads the given vids."""

    def __init__(self, folder: Path, parts: list[ExactPart], dim: int) -> None:
        self.dim = dim
        self.parts = sorted(parts, key=lambda p: p.first_vid)
        self.starts = np.asarray([p.first_vid for p in self.parts], dtype=np.int64)
        self.ends = self.starts + np.asarray([p.rows for p in self.parts], dtype=np.int64)
        self.folder = folder
        self._maps: dict[int, np.ndarray] = {}
        # opened now, mapped on first use: a reader keeps its version's files even after a writer has published
        # a newer version and deleted this folder (as ragkit.index.segments.Segment does)
        self._fds: dict[int, int] = {i: os.open(folder / p.file, os.O_RDONLY) for i, p in enumerate(self.parts)}

    def __bool__(self) -> bool:
        return bool(self.parts)

    def _map(self, i: int) -> np.ndarray:
        if i not in self._maps:
            part = self.parts[i]
            handle = mmap.mmap(self._fds[i], 0, access=mmap.ACCESS_READ)
            if hasattr(mmap, "MADV_RANDOM"):  # no read-around: a candidate's row is a few KiB, not 128 KiB
                handle.madvise(mmap.MADV_RANDOM)
            self._maps[i] = np.frombuffer(handle, dtype=part.dtype, count=part.rows * self.dim,
                                          offset=part.offset).reshape(part.rows, self.dim)
        return self._maps[i]

    def _prefetch(self, i: int, local: np.ndarray) -> None:
        """Ask the kernel for every row at once (asynchronous reads, in parallel on the device) before the
        copy below faults them in one by one: on a cold cache, R candidates cost about one read's latency,
        not R of them."""
        if not hasattr(os, "posix_fadvise") or len(local) < 2:
            return
        part = self.parts[i]
        row_bytes = self.dim * np.dtype(part.dtype).itemsize
        for row in local.tolist():
            os.posix_fadvise(self._fds[i], part.offset + row * row_bytes, row_bytes, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        self._maps.clear()
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        self.close()

    def covers(self, vids: np.ndarray) -> bool:
        which = np.searchsorted(self.starts, vids, side="right") - 1
        if (which < 0).any():
            return False
        return bool((vids < self.ends[which]).all())

    def rows(self, vids: np.ndarray) -> np.ndarray:
        """float32 (len(vids), dim); reads are sorted by position within each file (fewer seeks)."""
        vids = np.asarray(vids, dtype=np.int64)
        out = np.empty((len(vids), self.dim), np.float32)
        which = np.searchsorted(self.starts, vids, side="right") - 1
        for i in np.unique(which):
            mask = np.flatnonzero(which == i)
            local = vids[mask] - self.starts[i]
            order = np.argsort(local, kind="stable")
            mapped = self._map(int(i))
            self._prefetch(int(i), local[order])
            out[mask[order]] = mapped[local[order]]
        return out

    def rerank(self, queries: np.ndarray, vids: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """The k best of each query's candidate vids (-1 = none) by exact score: (scores, vids), -inf/-1 padded."""
        live = vids >= 0
        flat = np.unique(vids[live])
        vectors = self.rows(flat)
        position = np.searchsorted(flat, np.where(live, vids, flat[0] if len(flat) else 0))
        candidates = vectors[position]  # (queries, R, dim)
        if metric == "l2":
            scores = -np.einsum("qrd,qrd->qr", candidates - queries[:, None, :], candidates - queries[:, None, :])
        else:
            scores = np.einsum("qrd,qd->qr", candidates, queries)
        scores = np.where(live, scores, -np.inf).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        scores, vids = np.take_along_axis(scores, order, 1), np.take_along_axis(vids, order, 1)
        return scores, np.where(np.isfinite(scores), vids, -1)
