"""Segments: the immutable pieces an index version is made of (a base plus small deltas, as in Lucene).

A segment holds the vectors and passages one change added (`seg-NNNNNN.faiss`, `seg-NNNNNN.sqlite`) and
the vids that change removed from earlier segments (`seg-NNNNNN.deletes.npy`). A segment is written once,
in the staging folder of the version that creates it, and later versions take it over as a hard link: a
change of k passages writes O(k) bytes, and every version folder still holds every file it needs.

Search runs on each segment and merges the top k by score. A dead vid is dropped by over-fetching
k + (dead vids in the segment) candidates for flat codes with few dead vids (a selector would send flat
search off its BLAS path), and filtered inside Faiss with an IDSelector otherwise (HNSW, IVF, many dead)
where the index type takes search parameters (PQ does not: it always over-fetches), so every segment
returns its k best live hits, and the merge returns what one index holding the live passages would.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ragkit.index import vectors as fv
from ragkit.index.exact import ExactPart
from ragkit.index.store import PassageStore

TEMPLATE = "template.faiss"  # the trained, empty Faiss index every new delta segment starts from
OVERFETCH_MAX = 1024  # dead vids in a segment up to which flat search over-fetches rather than filters in Faiss


@dataclass(frozen=True)
class SegmentMeta:
    """What the manifest records of one segment."""

    name: str
    rows: int
    vid_min: int | None = None
    vid_max: int | None = None
    vectors: str | None = None
    passages: str | None = None
    deletes: str | None = None
    sparse: str | None = None  # its BM25 part (ragkit.index.sparse), when the index has a sparse side
    exact: tuple[ExactPart, ...] = ()  # its vectors kept on disk for re-ranking (ragkit.index.exact)
    shares_quantizer: bool = False  # an IVF delta whose coarse quantiser is the template's, not in its file

    @property
    def files(self) -> list[str]:
        return [f for f in (self.vectors, self.passages, self.deletes, self.sparse) if f] + [p.file for p in self.exact]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "rows": self.rows, "vid_min": self.vid_min, "vid_max": self.vid_max,
                "vectors": self.vectors, "passages": self.passages, "deletes": self.deletes,
                **({"sparse": self.sparse} if self.sparse else {}),
                **({"exact": [p.to_json() for p in self.exact]} if self.exact else {}),
                **({"shares_quantizer": True} if self.shares_quantizer else {})}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "SegmentMeta":
        return cls(str(obj["name"]), int(obj["rows"]), obj.get("vid_min"), obj.get("vid_max"), obj.get("vectors"),
                   obj.get("passages"), obj.get("deletes"), obj.get("sparse"),
                   tuple(ExactPart.from_json(p) for p in obj.get("exact") or ()), bool(obj.get("shares_quantizer")))


def segment_name(version: int) -> str:
    return f"seg-{version:06d}"


def link_into(source_dir: Path, names: list[str], target_dir: Path) -> None:
    """Take files over from an older version: a hard link (no bytes copied), or a copy where the file
    system has no hard links."""
    for name in names:
        target = target_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(source_dir / name, target)


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no bytes copied), or a copy where the file system has no hard links (or the two are on
    different file systems)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def read_held_index(fd: int | None, path: Path) -> Any:
    """The Faiss index of `path`, read through `fd` when it is held open (the version folder may have been
    deleted by a writer since); unreadable is exit 4 naming the file, with what Faiss could not read."""
    import faiss

    by_fd = f"/proc/self/fd/{fd}"
    try:
        return faiss.read_index(by_fd if fd is not None and os.path.exists(by_fd) else str(path))
    except RuntimeError as exc:  # Faiss says what it could not read (an impossible ntotal, a bad header)
        from ragkit.errors import ResourceError

        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise ResourceError(f"{path}: not a readable Faiss index ({detail[:200]})",
                            hint="Check it with `ragkit index info DIR --verify`; restore it or rebuild.") from None


class SharedTemplate:
    """The version's trained template, read at most once per open index and shared by its deltas' quantisers.
    The file is held open from the start, like the segments' (a reader outlives a writer's deletion of its
    version)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_RDONLY)
        self._index: Any = None

    def __call__(self) -> Any:
        if self._index is None:
            self._index = read_held_index(self._fd, self.path)
            self.close()
        return self._index

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()


class Segment:
    """An open segment: the Faiss index is read on first search (a writer that only appends never reads
    the base's vectors), the passage store is opened read-only."""

    def __init__(self, version_dir: Path, meta: SegmentMeta, metric: str,
                 template: Callable[[], Any] | None = None) -> None:
        self.dir, self.meta, self.metric = version_dir, meta, metric
        self.template = template  # the trained template, for a delta that shares its coarse quantiser
        self._faiss: Any = None
        self._is_hnsw = self._is_ivf = False
        self.merged: set[str] = set()  # delta segments whose IVF lists were merged into this one, in memory
        self._store: PassageStore | None = None
        self.device = "cpu"
        self.want_device = "cpu"
        self.search_params: dict[str, int] = {}
        self.dead = np.zeros(0, np.int64)  # the dead vids that live in this segment, sorted
        self._selector: Any = None
        self._params: Any = None
        self._selector_ok: bool | None = None
        # Hold the files open from the start: a reader keeps its version even after a writer has published
        # a newer one and deleted this folder (the Faiss file is read on first search, through this fd).
        self._fd = os.open(version_dir / meta.vectors, os.O_RDONLY) if meta.vectors else None
        if meta.passages:
            self._store = PassageStore(version_dir / meta.passages, readonly=True)

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)  # type: ignore[arg-type]
            self._fd = None

    @property
    def rows(self) -> int:
        return self.meta.rows

    @property
    def store(self) -> PassageStore:
        if self._store is None:
            assert self.meta.passages
            self._store = PassageStore(self.dir / self.meta.passages, readonly=True)
        return self._store

    @property
    def faiss(self) -> Any:
        if self._faiss is None:
            assert self.meta.vectors
            index = read_held_index(self._fd, self.dir / self.meta.vectors)
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self.lend_quantizer(index)
            fv.set_search_params(index, self.search_params)
            if self.want_device != "cpu":
                index, self.device = fv.to_device(index, self.want_device)
            self._faiss = index
            self._is_hnsw = fv.is_hnsw(index)
            self._is_ivf = fv.is_ivf(index)
        return self._faiss

    def lend_quantizer(self, index: Any) -> None:
        """A copy of this segment's Faiss index, read from its file, gets the template's coarse quantiser when
        the delta was written without it."""
        if not self.meta.shares_quantizer:
            return
        from ragkit.errors import ResourceError

        if self.template is None or not fv.borrows_quantizer(index):
            raise ResourceError(f"{self.dir / str(self.meta.vectors)}: a delta sharing the template's coarse "
                                "quantiser, without a readable template", hint="Restore the index folder.")
        fv.lend_quantizer(index, self.template())

    @property
    def loaded(self) -> bool:
        return self._faiss is not None

    def adopt(self, other: "Segment") -> None:
        """Take over the Faiss index another open copy of this segment has read (and its search settings)."""
        self._faiss, self.device, self.want_device = other._faiss, other.device, other.want_device
        self._is_hnsw, self._is_ivf = other._is_hnsw, other._is_ivf
        self.merged = set(other.merged)
        fv.set_search_params(self._faiss, self.search_params)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def cpu_faiss(self) -> Any:
        return fv.to_cpu(self.faiss)

    def set_dead(self, dead: np.ndarray) -> None:
        self.dead = dead
        self._selector = self._params = None

    def set_search_params(self, params: dict[str, int]) -> None:
        self.search_params = {**self.search_params, **params}
        self._params = None
        if self._faiss is not None:
            fv.set_search_params(self._faiss, params)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best live hits: scores (higher is better; -inf where there is none) and vids (-1)."""
        index = self.faiss
        n = index.ntotal
        if n == 0:
            return np.full((len(queries), 0), -np.inf, np.float32), np.zeros((len(queries), 0), np.int64)
        kk = min(k, n)
        filtered = False
        # Flat codes with few dead vids: over-fetch and drop them (a selector sends flat search off its BLAS
        # path). Many dead, HNSW (whose efSearch would have to grow with k) or IVF (a per-code check costs
        # less than a deeper heap; measured): filter in Faiss.
        wants_selector = len(self.dead) > OVERFETCH_MAX or self._is_hnsw or self._is_ivf
        if len(self.dead) and wants_selector and self._selector_ok is not False:
            try:
                scores, vids = index.search(queries, kk, params=self._search_parameters())
                self._selector_ok = filtered = True
            except RuntimeError:
                if self._selector_ok:
                    raise
                self._selector_ok = False  # this index type takes no search parameters: over-fetch instead
        if not filtered:
            scores, vids = index.search(queries, min(n, kk + len(self.dead)))
        scores = -scores if self.metric == "l2" else scores
        invalid = vids < 0
        if not filtered and len(self.dead):
            invalid |= np.isin(vids, self.dead)
        if invalid.any():
            scores = np.where(invalid, -np.inf, scores).astype(np.float32)
            vids = np.where(invalid, -1, vids)
            order = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
            scores, vids = np.take_along_axis(scores, order, 1), np.take_along_axis(vids, order, 1)
        return scores[:, :kk], vids[:, :kk]

    def _search_parameters(self) -> Any:
        import faiss

        if self._params is None:
            inner = fv.inner_index(self.faiss)
            if hasattr(inner, "hnsw"):
                params = faiss.SearchParametersHNSW()
                params.efSearch = int(inner.hnsw.efSearch)
            elif isinstance(inner, faiss.IndexIVF):
                params = faiss.SearchParametersIVF()
                params.nprobe = int(inner.nprobe)
                params.max_codes = int(inner.max_codes)
            else:
                params = faiss.SearchParameters()
            self._selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(self.dead))
            self._selector.batch = self._selector  # keep the inner selector alive with the outer one
            params.sel = self._selector
            self._params = params
        return self._params


def merge_segments(segments: list[Segment], dead: np.ndarray, template: Any, *, block: int = 100_000) -> Any:
    """One Faiss index holding the live vectors of `segments`, with their vids.

    Flat codes and IVF lists are moved over as they are (`merge_from`: the codes a fresh index of the same
    training would hold), then the dead vids are removed; HNSW can neither merge nor remove, so its live
    vectors are reconstructed and inserted into a new graph."""
    import faiss

    merged = faiss.clone_index(template)
    if not fv.is_hnsw(template):
        try:
            for segment in segments:
                if segment.meta.vectors:
                    source = faiss.read_index(str(segment.dir / segment.meta.vectors))
                    segment.lend_quantizer(source)
                    merged.merge_from(source, 0)
            if len(dead):
                fv.remove(merged, dead)
            return merged
        except RuntimeError:
            merged = faiss.clone_index(template)  # this type cannot merge: reconstruct below
    for segment in segments:
        if not segment.meta.vectors:
            continue
        source = segment.cpu_faiss()
        live = segment.store.all_vids()
        live = live[~np.isin(live, dead)]
        for start in range(0, len(live), block):
            ids = live[start : start + block]
            fv.add(merged, fv.reconstruct(source, ids), ids)
    return merged
