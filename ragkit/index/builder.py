"""Writing one segment in blocks: passages go to SQLite and vectors to disk as they arrive, then Faiss is
trained on a sample and filled block by block, so building never holds the corpus in memory: peak memory
is the Faiss index itself plus one block and the training sample.

Vectors given as a `np.memmap` (embedding shards) are read where they lie; other arrays are appended to a
spill file in the staging folder (float16 stays float16), deleted once Faiss holds the vectors.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ragkit.errors import InputError, Location, ResourceError, UsageError
from ragkit.index import vectors as fv
from ragkit.index.exact import ExactPart, npy_part
from ragkit.index.segments import SegmentMeta, link_or_copy
from ragkit.index.store import DuplicateIdError, PassageStore
from ragkit.io.corpus import Passage
from ragkit.io.mapped import advise, drop_pages

ADD_BLOCK = 100_000  # vectors converted to float32 and added to Faiss at a time


def check_vectors(rows: int, vectors: np.ndarray, dim: int) -> None:
    """One vector per passage, of the index's dimension."""
    if vectors.ndim != 2 or vectors.shape[0] != rows:
        raise UsageError(f"expected {rows} vectors, got an array of shape {tuple(vectors.shape)}")
    if vectors.shape[1] != dim:
        raise ResourceError(f"vectors have dimension {vectors.shape[1]}, the index holds dimension {dim}")


# a row whose squared norm overflows float32 makes every inner product with it infinite (a shard scaled by 1e30)
_MAX_SQUARED_NORM = float(np.finfo(np.float32).max)


def finite_rows(vectors: np.ndarray, path: Path, first_row: int) -> np.ndarray:
    """`vectors` when every row is finite with a norm float32 arithmetic can square; otherwise the first bad
    row is named (1-based): such a passage would never come back from a search, or would break every search."""
    squared = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64)
    bad = ~np.isfinite(squared) | (squared > _MAX_SQUARED_NORM)
    if bad.any():
        row = int(np.argmax(bad))
        what = "is not finite" if not np.isfinite(vectors[row]).all() else f"has norm {np.sqrt(squared[row]):.3g}"
        raise InputError(Location(str(path), first_row + row + 1), f"row {first_row + row + 1}: the vector {what}")
    return vectors


class SegmentWriter:
    def __init__(self, staging: Path, name: str, dim: int, first_vid: int, *, source: str = "<passages>") -> None:
        self.staging, self.name, self.dim = staging, name, dim
        self.source = source
        self.next_vid = first_vid
        self.rows = 0  # passages stored
        self.vectors = 0  # vectors given (equal to rows once the build is complete)
        self.store = PassageStore(staging / f"{name}.sqlite", bulk=True)
        self._blocks: list[np.ndarray] = []
        self._vids: list[np.ndarray] = []
        self._spill: Any = None
        self._spill_dtype: np.dtype | None = None
        self._spill_rows = 0
        # (file, first row, rows) of each block given as a slice of a whole .npy on disk; None for the others
        self._origins: list[tuple[Path, int, int] | None] = []
        # seconds spent in each phase (store, fill, write; write_base adds train): the manifest records them,
        # so the build-time model (ragkit.index.build_time) can be checked against any build, phase by phase
        self.phase_seconds: dict[str, float] = {}

    def _timed(self, phase: str, began: float) -> None:
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.perf_counter() - began

    @property
    def spill_path(self) -> Path:
        return self.staging / f".{self.name}.spill"

    def add(self, passages: Sequence[Passage], vectors: np.ndarray, *, vids: Sequence[int] | None = None,
            lines: Sequence[int] | None = None, origin: tuple[Path, int] | None = None) -> None:
        """Store passages and their vectors (row i embeds passages[i]); `lines` are their line numbers in
        `source`, for the error a duplicate id raises; `origin` (a .npy file, first row) says that `vectors`
        are those rows of that file, which an index keeping exact vectors then links instead of copying."""
        if len(passages) == 0:
            return
        check_vectors(len(passages), vectors, self.dim)
        ids = (np.arange(self.next_vid, self.next_vid + len(passages), dtype=np.int64) if vids is None
               else np.asarray(vids, dtype=np.int64))
        self._insert(passages, ids, lines)
        self._vids.append(ids)
        self.next_vid = max(self.next_vid, int(ids.max()) + 1)
        self.rows += len(passages)
        self.vectors += len(passages)
        if isinstance(vectors, np.memmap):
            self._blocks.append(vectors)
            self._origins.append((Path(origin[0]), int(origin[1]), len(vectors)) if origin is not None else None)
        else:
            self._append_spill(np.asarray(vectors))

    def add_passages(self, passages: Sequence[Passage], *, lines: Sequence[int] | None = None) -> None:
        """Store passages whose vectors come later (`add_vectors`, by vid), e.g. released embeddings."""
        if not passages:
            return
        ids = np.arange(self.next_vid, self.next_vid + len(passages), dtype=np.int64)
        self._insert(passages, ids, lines)
        self.next_vid += len(passages)
        self.rows += len(passages)

    def add_vectors(self, vectors: np.ndarray, vids: Sequence[int]) -> None:
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ResourceError(f"vectors of shape {tuple(vectors.shape)}, the index holds dimension {self.dim}")
        self._vids.append(np.asarray(vids, dtype=np.int64))
        self.vectors += len(vectors)
        self._append_spill(np.asarray(vectors))

    def _insert(self, passages: Sequence[Passage], ids: np.ndarray, lines: Sequence[int] | None) -> None:
        began = time.perf_counter()
        try:
            self.store.insert(passages, ids.tolist())
        except DuplicateIdError as exc:
            line = lines[exc.position] if lines is not None else None
            raise InputError(Location(self.source, line, "id"), f"duplicate id '{exc.passage_id}'") from None
        self._timed("store", began)

    def _append_spill(self, vectors: np.ndarray) -> None:
        if self._spill is None:
            self._spill_dtype = np.dtype(np.float16 if vectors.dtype == np.float16 else np.float32)
            self._spill = open(self.spill_path, "wb")
            self._blocks.append(None)  # type: ignore[arg-type]  # the spill's place among the blocks
            self._origins.append(None)
        self._spill.write(np.ascontiguousarray(vectors, dtype=self._spill_dtype).tobytes())
        self._spill_rows += len(vectors)

    def blocks(self) -> list[np.ndarray]:
        """The vectors in row order, as arrays on disk."""
        if self._spill is not None and not self._spill.closed:
            self._spill.close()
        out = []
        for block in self._blocks:
            if block is None:
                out.append(np.memmap(self.spill_path, dtype=self._spill_dtype, mode="r", shape=(self._spill_rows, self.dim)))
            else:
                out.append(block)
        return out

    def vids(self) -> np.ndarray:
        return np.concatenate(self._vids) if self._vids else np.zeros(0, np.int64)

    def finish(self, faiss_index: Any, *, keep_exact: bool = False, share_quantizer: bool = False) -> SegmentMeta:
        """Add every vector to `faiss_index` (trained already), block by block; write the segment's files.
        `keep_exact`: also keep the vectors on disk for re-ranking (linked from the shards when possible);
        `share_quantizer`: `faiss_index` is a copy of the template, whose IVF coarse quantiser is not written
        again (readers take the template's)."""

        blocks = self.blocks()
        vids = self.vids()
        exact: tuple[ExactPart, ...] = ()
        linked = keep_exact and self._linkable_files(vids)
        copy = self._exact_copy(vids) if keep_exact and not linked else None
        start = 0
        began = time.perf_counter()
        for block in blocks:
            for offset in range(0, len(block), ADD_BLOCK):
                chunk = np.ascontiguousarray(block[offset : offset + ADD_BLOCK], dtype=np.float32)
                fv.add(faiss_index, chunk, vids[start : start + len(chunk)])
                if copy is not None:
                    copy[vids[start : start + len(chunk)] - int(vids.min())] = chunk
                    drop_pages(copy)
                start += len(chunk)
                drop_pages(block)  # the shards' pages must not count against the build's memory
        self._timed("fill", began)
        began = time.perf_counter()
        self.store.commit()
        self.store.close()
        cpu_index = fv.to_cpu(faiss_index)
        shares = share_quantizer and fv.is_ivf(cpu_index)
        fv.write_index(cpu_index, str(self.staging / f"{self.name}.faiss"), share_quantizer=shares)
        if linked:
            exact = self._link_exact(linked, int(vids.min()))
        elif copy is not None:
            copy.flush()
            name = f"{self.name}.exact-00000.npy"
            del copy
            exact = (npy_part(self.staging / name, name, int(vids.min())),)
        if self.spill_path.exists():
            os.unlink(self.spill_path)
        self._timed("write", began)
        return SegmentMeta(self.name, self.rows, int(vids.min()) if len(vids) else None,
                           int(vids.max()) if len(vids) else None, f"{self.name}.faiss", f"{self.name}.sqlite",
                           exact=exact, shares_quantizer=shares)

    def _linkable_files(self, vids: np.ndarray) -> list[Path]:
        """The .npy files the blocks are, when they cover each file whole, in order, with consecutive vids."""
        if not len(vids) or any(o is None for o in self._origins):
            return []
        if not np.array_equal(vids, np.arange(int(vids[0]), int(vids[0]) + len(vids))):
            return []
        files: list[Path] = []
        expected = 0
        for path, first, rows in self._origins:  # type: ignore[misc]
            if files and path == files[-1] and first == expected:
                expected += rows
                continue
            if files and expected != np.load(files[-1], mmap_mode="r").shape[0]:
                return []
            if first != 0:
                return []
            files.append(path)
            expected = rows
        if expected != np.load(files[-1], mmap_mode="r").shape[0]:
            return []
        return files

    def _link_exact(self, files: list[Path], first_vid: int) -> tuple[ExactPart, ...]:
        parts = []
        for i, path in enumerate(files):
            name = f"{self.name}.exact-{i:05d}.npy"
            link_or_copy(path, self.staging / name)
            part = npy_part(self.staging / name, name, first_vid)
            parts.append(part)
            first_vid += part.rows
        return tuple(parts)

    def _exact_copy(self, vids: np.ndarray) -> np.ndarray:
        """A new float16 .npy for the vectors in vid order, filled as Faiss is: half of float32's disk (32 GB,
        not 64, at 21M x 768), and re-ranking by float16 values reorders only candidates whose scores agree
        to ~1e-3."""
        span = int(vids.max()) - int(vids.min()) + 1
        return np.lib.format.open_memmap(self.staging / f"{self.name}.exact-00000.npy", mode="w+", dtype=np.float16,
                                         shape=(span, self.dim))

    def abort(self) -> None:
        if self._spill is not None and not self._spill.closed:
            self._spill.close()
        self.store.close()


SAMPLE_CHUNK_ROWS = 4096  # sampled rows read between two page drops (a chunk spans ~70 MB of a 17% sample)


class RowSource:
    """Row access over a list of on-disk blocks, enough for `train_if_needed` to read a sample."""

    def __init__(self, blocks: list[np.ndarray], dim: int) -> None:
        self.blocks = blocks
        self.offsets = np.cumsum([0] + [len(b) for b in blocks])
        self.shape = (int(self.offsets[-1]), dim)

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        out = np.empty((len(rows), self.shape[1]), np.float32)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for b in np.unique(which):
            where = np.flatnonzero(which == b)
            block = self.blocks[b]
            # no read-around for rows read at random: each fault otherwise maps up to 128 KiB around the row,
            # and a sample of 349k rows drawn from 21M x 768 shards mapped (and read) nearly all 32 GB of them
            # (16.8 GiB resident, two minutes into training)
            advise(block, "MADV_RANDOM")
            # and in chunks, the pages dropped after each: pages already in the page cache (a spill just
            # written) are mapped around each fault whatever madvise says, so a 17% sample of a 2M x 768 spill
            # mapped all 6 GB of it (8.2 GiB peak for a released import)
            for start in range(0, len(where), SAMPLE_CHUNK_ROWS):
                chunk = where[start : start + SAMPLE_CHUNK_ROWS]
                out[chunk] = block[rows[chunk] - self.offsets[b]]
                drop_pages(block)
            advise(block, "MADV_NORMAL")  # the fill reads it in order next, with read-ahead
        return out
