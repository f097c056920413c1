"""The in-process retriever: the index's own embedder over one ragkit index (Ray actors come later)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ragkit.index import Hit, Index
from ragkit.models.encoder import Encoder


class Retriever:
    """Embeds query texts with the model that built the index and returns its top-k hits."""

    def __init__(self, index: str | Path | Index, *, model: str | None = None, device: str | None = None,
                 threads: int | None = None, batch_size: int = 64) -> None:
        self.index = index if isinstance(index, Index) else Index.open(index, threads=threads)
        built = self.index.encoder
        self.encoder = Encoder(model or built.name, device=device, normalize=built.normalize,
                               max_seq_length=built.max_seq_length)
        self.index.check_encoder(self.encoder.info)
        self.batch_size = batch_size

    def retrieve(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        if not queries:
            return []
        vectors = self.encoder.encode_queries(list(queries), batch_size=self.batch_size)
        return self.index.search(vectors, k)
