"""The sparse (BM25) side of an index, with bm25s: stored in the version folder beside the vectors.

bm25s has no incremental update, so every index change rebuilds it from the passage store (the texts are
all there): about a second per 10k passages on one CPU core, small next to re-embedding. Documents are
`title + " " + text`, English stopwords removed, Snowball-stemmed (PyStemmer) when `stemmer` is "english".

    VERSION/sparse/            bm25s.BM25.save() files
    VERSION/sparse/vids.npy    row i of the BM25 matrix is the passage with this vid
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ragkit.errors import ResourceError

SPARSE_DIR = "sparse"
VIDS_FILE = "vids.npy"


@dataclass(frozen=True)
class SparseConfig:
    k1: float = 1.5
    b: float = 0.75
    method: str = "lucene"
    stopwords: str = "en"
    stemmer: str | None = "english"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> SparseConfig:
        return cls(**{k: obj[k] for k in ("k1", "b", "method", "stopwords", "stemmer") if k in obj})


def _stemmer(name: str | None) -> Any:
    if not name:
        return None
    import Stemmer

    return Stemmer.Stemmer(name)


def _require_bm25s() -> Any:
    try:
        import bm25s
    except ImportError:
        raise ResourceError("the sparse (BM25) side needs bm25s", hint="pip install bm25s PyStemmer") from None
    return bm25s


def build_sparse(directory: Path, docs: Iterable[tuple[int, str]], config: SparseConfig) -> int:
    """Index (vid, text) pairs into directory/sparse; returns the number of documents."""
    bm25s = _require_bm25s()
    vids, texts = [], []
    for vid, text in docs:
        vids.append(vid)
        texts.append(text)
    target = directory / SPARSE_DIR
    target.mkdir(parents=True, exist_ok=True)
    retriever = bm25s.BM25(k1=config.k1, b=config.b, method=config.method)
    if texts:
        tokens = bm25s.tokenize(texts, stopwords=config.stopwords, stemmer=_stemmer(config.stemmer), show_progress=False)
        retriever.index(tokens, show_progress=False)
        retriever.save(str(target))
    np.save(target / VIDS_FILE, np.asarray(vids, dtype=np.int64))
    return len(vids)


class SparseSide:
    """A loaded BM25 index: search(texts, k) -> (scores, vids), -1 where fewer than k documents match."""

    def __init__(self, directory: Path, config: SparseConfig) -> None:
        bm25s = _require_bm25s()
        self.config = config
        self.vids = np.load(directory / SPARSE_DIR / VIDS_FILE)
        self.retriever = bm25s.BM25.load(str(directory / SPARSE_DIR)) if len(self.vids) else None
        self.stemmer = _stemmer(config.stemmer)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        import bm25s

        k = min(k, max(1, len(self.vids)))  # memory follows the corpus, not --k
        queries = [q[:MAX_QUERY_CHARS] for q in queries]
        scores = np.zeros((len(queries), k), dtype=np.float32)
        vids = np.full((len(queries), k), -1, dtype=np.int64)
        if self.retriever is None or not queries:
            return scores, vids
        tokens = bm25s.tokenize(list(queries), stopwords=self.config.stopwords, stemmer=self.stemmer,
                                show_progress=False)
        fetch = min(k, len(self.vids))
        rows, found = self.retriever.retrieve(tokens, k=fetch, show_progress=False, n_threads=1)
        for q in range(len(queries)):
            keep = found[q] > 0  # a document that shares no term with the query is not a hit
            n = int(keep.sum())
            scores[q, :n] = found[q][keep]
            vids[q, :n] = self.vids[rows[q][keep]]
        return scores, vids


MAX_QUERY_CHARS = 65536  # a BM25 query longer than this is a document, not a query; cut to bound its cost


def sparse_files(version_dir: Path) -> list[str]:
    folder = version_dir / SPARSE_DIR
    return sorted(str(p.relative_to(version_dir)) for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
