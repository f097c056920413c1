"""The sparse (BM25) side of an index: one part per segment, so that a change costs the change.

Each segment with passages has SEGMENT.bm25.npz beside its vectors: its rows' vids, document lengths and
term frequencies (a CSC matrix over the segment's own vocabulary). Like the segment it never changes once
written: `index add` writes the new segment's part only, `remove` writes nothing (tombstones hide removed
rows at query time), compaction builds the merged segment's part from its passages.

Tokenisation is bm25s' (documents are `title + " " + text`, English stopwords removed, Snowball-stemmed with
PyStemmer when `stemmer` is "english"), and so is the scoring: Lucene's BM25, idf = ln(1 + (N - df + 0.5) /
(df + 0.5)) and tf / (k1 (1 - b + b dl / avgdl) + tf) per query token (a repeated token counts again). bm25s
precomputes those scores over one corpus and cannot change it; here N, df and avgdl are taken at query time
over the live passages of every segment, so a search returns what a fresh bm25s build of the same passages
returns (tested) while an update touches none of the old parts. This is written by hand for that reason.

Indexes of ragkit before this layout kept one bm25s folder per version (VERSION/sparse/); they still search
through bm25s, and their next change writes the per-segment parts.
"""

from __future__ import annotations

import math
import weakref
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ragkit.errors import ResourceError, UsageError

SPARSE_DIR = "sparse"  # the older layout: one bm25s folder per version
VIDS_FILE = "vids.npy"
PART_SUFFIX = ".bm25.npz"
TOKENIZE_BLOCK = 20_000  # documents tokenised at once while a part is written


@dataclass(frozen=True)
class SparseConfig:
    k1: float = 1.5
    b: float = 0.75
    method: str = "lucene"
    stopwords: str = "en"
    stemmer: str | None = "english"

    def __post_init__(self) -> None:
        # `--bm25-k1 inf` was written into the manifest as Infinity and every sparse search found nothing
        if not (math.isfinite(self.k1) and self.k1 >= 0):
            raise UsageError(f"bm25 k1 {self.k1}: expected a finite number >= 0")
        if not (math.isfinite(self.b) and 0 <= self.b <= 1):
            raise UsageError(f"bm25 b {self.b}: expected a number in [0, 1]")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def tokenization(self) -> str:
        """What a part's terms depend on (k1, b and the method apply at query time)."""
        return f"{self.stopwords}|{self.stemmer}"

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


def part_name(segment: str) -> str:
    return f"{segment}{PART_SUFFIX}"


def write_part(path: Path, docs: Iterable[tuple[int, str]], config: SparseConfig) -> int:
    """Tokenise (vid, text) pairs into one segment's part at `path`; returns the number of documents."""
    import scipy.sparse

    bm25s = _require_bm25s()
    stemmer = _stemmer(config.stemmer)
    vocab: dict[str, int] = {}
    vids: list[int] = []
    lengths: list[int] = []
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    block: list[tuple[int, str]] = []

    def flush() -> None:
        tokens = bm25s.tokenize([t for _, t in block], stopwords=config.stopwords, stemmer=stemmer,
                                show_progress=False)
        local = np.empty(len(tokens.vocab), dtype=np.int64)  # the block's token ids -> the part's
        for token, i in tokens.vocab.items():
            local[i] = vocab.setdefault(token, len(vocab))
        sizes = np.asarray([len(ids) for ids in tokens.ids], dtype=np.int64)
        if sizes.sum():
            rows.append(np.repeat(np.arange(len(vids), len(vids) + len(block), dtype=np.int64), sizes))
            cols.append(local[np.concatenate([np.asarray(ids, dtype=np.int64) for ids in tokens.ids])])
        lengths.extend(sizes.tolist())
        vids.extend(v for v, _ in block)
        block.clear()

    for vid, text in docs:
        block.append((vid, text))
        if len(block) >= TOKENIZE_BLOCK:
            flush()
    if block:
        flush()
    n = len(vids)
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    # duplicates (a token repeated in a document) are summed into its term frequency
    tf = scipy.sparse.coo_matrix((np.ones(len(r), np.float32), (r, c)), shape=(n, len(vocab))).tocsc()
    tf.sum_duplicates()
    terms = "\n".join(vocab).encode("utf-8")  # bm25s tokens are \w runs: never a newline
    with open(path, "wb") as handle:
        np.savez(handle, vids=np.asarray(vids, dtype=np.int64),
                 lengths=np.asarray(lengths, dtype=np.int32),
                 indptr=tf.indptr.astype(np.int64), indices=tf.indices.astype(np.int32), tf=tf.data.astype(np.float32),
                 terms=np.frombuffer(terms, dtype=np.uint8), tokenizer=np.frombuffer(
                     config.tokenization.encode(), dtype=np.uint8))
    return n


class Part:
    """One segment's part, read once per file (hard-linked into later versions, the same inode)."""

    def __init__(self, path: Path) -> None:
        try:
            with np.load(path, allow_pickle=False) as z:
                # kept as stored (int32 lengths, float32 whole-number frequencies): scoring promotes each
                # posting slice to float64, so a float64 copy of the whole part would only double its memory
                self.vids, self.lengths = z["vids"], z["lengths"]
                self.indptr, self.indices, self.tf = z["indptr"], z["indices"], z["tf"]
                terms = z["terms"].tobytes().decode("utf-8")
                self.tokenizer = z["tokenizer"].tobytes().decode()
        except (OSError, ValueError, KeyError) as exc:
            raise ResourceError(f"{path}: unreadable BM25 part ({exc})") from None
        self.vocab = {t: i for i, t in enumerate(terms.split("\n"))} if terms else {}
        self.path = path


# parts in use, by file identity: a version that links a part over (same inode) shares it with the version
# a server still holds, and a part no version uses any more is freed
_PARTS: "weakref.WeakValueDictionary[tuple[int, int, int, int], Part]" = weakref.WeakValueDictionary()


def load_part(path: Path) -> Part:
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    part = _PARTS.get(key)
    if part is None:
        part = _PARTS[key] = Part(path)
    return part


class SegmentedBM25:
    """search(texts, k) -> (scores, vids) over the parts of every segment, -1 where fewer than k match;
    the statistics (N, df, avgdl) are those of the passages not in `dead`."""

    def __init__(self, paths: Sequence[Path], dead: np.ndarray, config: SparseConfig) -> None:
        self.config = config
        self.parts = [load_part(p) for p in paths]
        for part in self.parts:
            if part.tokenizer != config.tokenization:
                raise ResourceError(f"{part.path}: tokenised with {part.tokenizer}, the index says {config.tokenization}")
        self.live = [~np.isin(p.vids, dead) if len(dead) else np.ones(len(p.vids), bool) for p in self.parts]
        self.n = int(sum(m.sum() for m in self.live))
        total = sum(float(p.lengths[m].sum()) for p, m in zip(self.parts, self.live))
        self.avgdl = total / self.n if self.n else 1.0
        self.stemmer = _stemmer(config.stemmer)
        self.offsets = np.cumsum([0] + [len(p.vids) for p in self.parts])
        self.all_vids = np.concatenate([p.vids for p in self.parts]) if self.parts else np.zeros(0, np.int64)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        bm25s = _require_bm25s()
        k = min(k, max(1, self.n))  # memory follows the corpus, not --k
        queries = [q[:MAX_QUERY_CHARS] for q in queries]
        scores = np.zeros((len(queries), k), dtype=np.float32)
        vids = np.full((len(queries), k), -1, dtype=np.int64)
        if not self.n or not queries:
            return scores, vids
        tokens = bm25s.tokenize(list(queries), stopwords=self.config.stopwords, stemmer=self.stemmer,
                                show_progress=False, return_ids=False)
        for q, query_tokens in enumerate(tokens):
            rows, values = self._score(Counter(query_tokens))
            if not len(rows):
                continue
            take = min(k, len(rows))
            top = np.argpartition(-values, take - 1)[:take] if take < len(rows) else np.arange(len(rows))
            top = top[np.lexsort((rows[top], -values[top]))]  # by score, ties by position
            scores[q, :take] = values[top]
            vids[q, :take] = self.all_vids[rows[top]]
        return scores, vids

    def _score(self, counts: Counter) -> tuple[np.ndarray, np.ndarray]:
        """Rows (positions over all parts) with a positive score, and their scores."""
        k1, b = self.config.k1, self.config.b
        found_rows: list[np.ndarray] = []
        found_values: list[np.ndarray] = []
        for token, weight in counts.items():
            postings = []
            for i, (part, live) in enumerate(zip(self.parts, self.live)):
                col = part.vocab.get(token)
                if col is None:
                    continue
                lo, hi = part.indptr[col], part.indptr[col + 1]
                rows = part.indices[lo:hi]
                keep = live[rows]
                postings.append((i, rows[keep], part.tf[lo:hi][keep].astype(np.float64)))
            df = sum(len(r) for _, r, _ in postings)
            if not df:
                continue
            idf = math.log(1 + (self.n - df + 0.5) / (df + 0.5))
            for i, rows, tf in postings:
                dl = self.parts[i].lengths[rows].astype(np.float64)
                found_rows.append(rows.astype(np.int64) + self.offsets[i])
                found_values.append(weight * idf * tf / (k1 * (1 - b + b * dl / self.avgdl) + tf))
        if not found_rows:
            return np.zeros(0, np.int64), np.zeros(0)
        rows, values = np.concatenate(found_rows), np.concatenate(found_values)
        total = int(self.offsets[-1])
        if len(rows) * 8 >= total:  # many postings: one dense accumulator over every row is cheapest
            sums = np.bincount(rows, weights=values, minlength=total)
            hit = np.flatnonzero(sums)
            return hit, sums[hit]
        unique, inverse = np.unique(rows, return_inverse=True)  # few: sort them instead of touching every row
        return unique, np.bincount(inverse, weights=values)


class LegacySparseSide:
    """An index version of the older layout: one bm25s index of its live passages (VERSION/sparse/)."""

    def __init__(self, directory: Path, config: SparseConfig) -> None:
        bm25s = _require_bm25s()
        self.config = config
        self.vids = np.load(directory / SPARSE_DIR / VIDS_FILE)
        self.retriever = bm25s.BM25.load(str(directory / SPARSE_DIR)) if len(self.vids) else None
        self.stemmer = _stemmer(config.stemmer)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        import bm25s

        k = min(k, max(1, len(self.vids)))
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
