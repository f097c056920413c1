"""The in-process retriever: the index's own embedder (and its BM25 side) over one ragkit index."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dataclasses import dataclass

import numpy as np

from ragkit.errors import ResourceError, UsageError
from ragkit.index import Hit, Index
from ragkit.models.encoder import Encoder
from ragkit.retrieval.fusion import FUSIONS, fuse

MODES = ("dense", "sparse", "hybrid")


@dataclass(frozen=True)
class RetrievalMode:
    """dense (embedder + Faiss), sparse (BM25), or hybrid (both, fused)."""

    mode: str = "dense"
    fusion: str = "rrf"  # rrf or score
    weight: float = 0.5  # the dense side's share in hybrid fusion
    depth: int = 100  # hits fetched from each side before fusing

    @classmethod
    def checked(cls, mode: str, fusion: str, weight: float, *, mode_flag: str = "--retrieval-mode") -> RetrievalMode:
        """The mode of a command's flags (or an options dataclass), checked now, before any model loads, in
        the flags' own names (`index search` says --mode, generate and eval --retrieval-mode)."""
        chosen = cls(mode, fusion, weight)
        chosen.validate(mode_flag)
        return chosen

    def validate(self, mode_flag: str = "retrieval mode") -> None:
        """Refused in the caller's words: a command passes the flag its users typed (`--mode` for
        `index search`, `--retrieval-mode` for generate and eval)."""
        if self.mode not in MODES:
            raise UsageError(f"{mode_flag} {self.mode}: expected one of {', '.join(MODES)}")
        if self.fusion not in FUSIONS:
            raise UsageError(f"--fusion {self.fusion}: expected one of {', '.join(FUSIONS)}")
        if not 0.0 <= self.weight <= 1.0:
            raise UsageError(f"--dense-weight {self.weight}: expected a number in [0, 1]")


class Retriever:
    """Embeds query texts with the model that built the index and returns its top-k hits; with a sparse
    side, also BM25 or hybrid retrieval (the embedder is not loaded for sparse-only retrieval)."""

    def __init__(self, index: str | Path | Index, *, model: str | None = None, device: str | None = None,
                 threads: int | None = None, batch_size: int = 64, mode: RetrievalMode = RetrievalMode(),
                 backend: str = "torch") -> None:
        mode.validate()
        self.index = index if isinstance(index, Index) else Index.open(index, threads=threads)
        self.mode = mode
        if mode.mode != "dense" and not self.index.has_sparse:
            raise ResourceError(f"{self.index.root} has no sparse (BM25) side for --mode {mode.mode}",
                                hint=f"Add one with `ragkit index sparse {self.index.root}`.")
        self.encoder: Encoder | None = None
        if mode.mode != "sparse":
            self.encoder = Encoder.for_index(self.index, model=model, device=device, backend=backend, queries=True)
        self.batch_size = batch_size

    def retrieve(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        return self.search(queries, k)

    def encode(self, queries: Sequence[str]) -> np.ndarray:
        """Query vectors for the dense side (what `search(..., vectors=)` takes): a server encodes the
        queries of many requests at once, then searches each request's group."""
        if self.encoder is None:
            raise UsageError("this retriever was opened for --mode sparse: it has no embedder to encode queries")
        return self.encoder.encode_queries(list(queries), batch_size=self.batch_size)

    def search(self, queries: Sequence[str], k: int, *, mode: RetrievalMode | None = None,
               vectors: np.ndarray | None = None) -> list[list[Hit]]:
        """Top-k hits per query in `mode` (default: the retriever's); `vectors`, when given, are the
        queries already encoded by `encode`."""
        mode = mode or self.mode
        if not queries:
            return []
        if mode.mode != "dense" and not self.index.has_sparse:
            raise ResourceError(f"{self.index.root} has no sparse (BM25) side for mode {mode.mode}",
                                hint=f"Add one with `ragkit index sparse {self.index.root}`.")
        if mode.mode == "sparse":
            return self.index.search_sparse(queries, k)
        if vectors is None:
            vectors = self.encode(queries)
        if mode.mode == "dense":
            return self.index.search(vectors, k)
        depth = max(k, mode.depth)
        dense = self.index.search(vectors, depth)
        sparse = self.index.search_sparse(queries, depth)
        return [fuse(d, s, k, method=mode.fusion, weight=mode.weight) for d, s in zip(dense, sparse)]

    def with_index(self, index: Index) -> "Retriever":
        """This retriever over another version of its index, sharing the loaded embedder when that version
        was embedded with the same model (a server's hot reload); a refreshed index loads its new model."""
        other = Retriever.__new__(Retriever)
        other.index, other.mode, other.batch_size = index, self.mode, self.batch_size
        other.encoder = self.encoder
        if self.encoder is not None and index.encoder.for_queries() != self.index.encoder.for_queries():
            other.encoder = Encoder.for_index(index, device=self.encoder.device, backend=self.encoder.backend,
                                              queries=True)
        return other
