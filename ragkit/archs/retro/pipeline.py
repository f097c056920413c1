"""RETRO's data pipeline: text -> token chunks -> chunk embeddings -> ragkit index -> neighbours.

Every artifact lives under one work folder with a manifest. Each stage records a key (a hash of its
parameters and of the key of the stage it reads) and the files it wrote with their sizes; a stage is
rebuilt when its key changed or one of its files is missing or has another size, and skipped otherwise.
Nothing is written outside the work folder and no marker can claim a stage that is not on disk (the two
things RETRO-pytorch's users hit: a cwd-relative `.tmp/` and `processed-stats.json`). Each stage writes
to a temporary name and renames, so a killed run leaves the previous artifact or none.

Layouts (docs/retro.md): chunks.npy int32 (C, m + 1), -1 after a document's end; doc_ids.npy int32 (C,);
seq_starts.npy int64 (S,); embeddings.npy float32 (C, dim); index/ (a ragkit index, passage id = chunk
row); neighbours.npy int32 (C, K), -1 = none.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ragkit.io.jsonl import open_text, read_text
from ragkit.console import progress
from ragkit.errors import InputError, Location, ResourceError, UsageError
from ragkit.io.atomic import atomic_open, write_json

FORMAT = "ragkit-retro-workdir"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PAD = -1  # no token: after a document's end, and in missing neighbours


@dataclass
class RetroDataConfig:
    data: str  # a folder of text files, or one file
    workdir: str
    glob: str = "**/*.txt"
    tokenizer: str = "smollm2-135m"
    embedder: str = "minilm"
    index_spec: str = "flat"
    chunk_size: int = 64
    seq_len: int = 512
    num_neighbors: int = 2
    extra_neighbors: int = 10  # fetched beyond K so that same-document hits can be dropped
    reprocess: bool = False
    device: str | None = None
    embed_batch_size: int = 64
    max_chunks: int = 0  # 0: every chunk; else whole documents, in file order, up to this many chunks
    max_index_memory: int | None = None  # bytes the chunk index may take (spec auto picks within it)

    def validate(self) -> None:
        if self.chunk_size < 1 or self.seq_len < self.chunk_size or self.seq_len % self.chunk_size:
            raise UsageError(f"--seq-len {self.seq_len} must be a positive multiple of --chunk-size {self.chunk_size}")
        if self.num_neighbors < 1:
            raise UsageError("--num-neighbors must be at least 1")
        if not self.workdir:
            raise UsageError("--workdir is required for --arch retro")


# -- documents -------------------------------------------------------------------------------------
@dataclass
class Document:
    source: str  # file, or file:line for JSONL
    text: str


def input_files(data: str | Path, glob: str) -> list[Path]:
    root = Path(data)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ResourceError(f"{root}: no such file or folder")
    files = sorted(p for p in root.glob(glob) if p.is_file())
    if not files:
        raise InputError(Location(str(root)), f"no file matches --glob '{glob}' (an empty folder?)")
    return files


def read_documents(files: list[Path]) -> Iterator[Document]:
    """One document per text file, or per JSONL line (its `text` field)."""
    for path in files:
        if path.suffix == ".jsonl":
            with open_text(path) as handle:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise InputError(Location(str(path), number), f"not JSON ({exc.msg})") from None
                    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                        raise InputError(Location(str(path), number, "text"), "missing or not a string")
                    yield Document(f"{path}:{number}", row["text"])
        else:
            yield Document(str(path), read_text(path))


def files_digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.resolve()}|".encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# -- tokenizer ---------------------------------------------------------------------------------------
def load_tokenizer(name: str) -> Any:
    """Any HF tokenizer by hub id, folder, .gguf or ragkit alias (default: the shipped SmolLM2 one)."""
    from transformers import AutoTokenizer

    from ragkit.models.registry import materialize, missing_model_error, quiet_transformers, resolve

    ref = resolve(name)
    quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(materialize(ref))
    except (OSError, ValueError) as exc:
        raise missing_model_error(ref, exc) from exc


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the vocabulary, merges and special tokens: two tokenizers with the same one agree on ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{body}|{tokenizer.eos_token_id}".encode()).hexdigest()[:32]


def keeps_newlines(tokenizer: Any) -> bool:
    """Whether text survives the tokenizer with its line breaks (BERT's does not: RETRO-pytorch's models
    could never write a new line, its users' complaint #23)."""
    ids = tokenizer("one\ntwo", add_special_tokens=False)["input_ids"]
    return "\n" in tokenizer.decode(ids)


def end_of_document_id(tokenizer: Any) -> int:
    """Each document ends with this token: EOS, else SEP (BERT-style tokenizers, as RETRO-pytorch uses)."""
    for candidate in (tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None)):
        if candidate is not None:
            return int(candidate)
    raise ResourceError("the tokenizer has neither an end-of-sequence nor a separator token, one of which RETRO "
                        "puts after each document")


def start_of_document_id(tokenizer: Any) -> int:
    """Each document starts with this token (BOS, else CLS, else the end token), so that a model can write
    one from nothing."""
    for candidate in (tokenizer.bos_token_id, getattr(tokenizer, "cls_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return end_of_document_id(tokenizer)


# -- manifest ----------------------------------------------------------------------------------------
def stage_key(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:32]


class Manifest:
    def __init__(self, workdir: Path) -> None:
        self.path = workdir / MANIFEST
        self.workdir = workdir
        self.data: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "stages": {}}
        if self.path.exists():
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise InputError(Location(str(self.path)), f"not JSON ({exc.msg})") from None
            if loaded.get("format") != FORMAT:
                raise ResourceError(f"{self.path}: not a ragkit RETRO work folder manifest")
            self.data = loaded

    def stage(self, name: str) -> dict[str, Any] | None:
        return self.data["stages"].get(name)

    def is_current(self, name: str, key: str) -> bool:
        """Built with these parameters, and every file it wrote is there with the recorded size."""
        entry = self.stage(name)
        if entry is None or entry["key"] != key:
            return False
        for rel, size in entry["files"].items():
            path = self.workdir / rel
            if not path.exists() or (size is not None and path.stat().st_size != size):
                return False
        return True

    def record(self, name: str, key: str, params: dict[str, Any], files: list[str], **extra: Any) -> None:
        sizes = {rel: (None if (self.workdir / rel).is_dir() else (self.workdir / rel).stat().st_size) for rel in files}
        self.data["stages"][name] = {"key": key, "params": params, "files": sizes,
                                     "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}
        write_json(self.path, self.data)


def _write_npy(path: Path, array: np.ndarray) -> None:
    """Atomically: a temp file in the same folder, then rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# -- stage 1: chunks ---------------------------------------------------------------------------------
@dataclass
class ChunkStats:
    documents: int
    tokens: int
    chunks: int
    sequences: int
    bytes: int


def chunk_documents(documents: Iterator[Document], tokenizer: Any, out: Path, *, chunk_size: int, seq_len: int,
                    batch: int = 256, where: str = "<data>", max_chunks: int = 0) -> ChunkStats:
    """Tokenize each document (newlines kept; BOS before, EOS after), cut it into chunks of m
    tokens plus the next chunk's first token, and start a training sequence every seq_len / m chunks within
    each document. Writes chunks.npy, doc_ids.npy, seq_starts.npy and documents.jsonl into `out`. With
    `max_chunks`, reading stops before the first document that would pass it (documents stay whole)."""
    m = chunk_size
    eod, sod = end_of_document_id(tokenizer), start_of_document_id(tokenizer)
    chunk_rows: list[np.ndarray] = []
    doc_rows: list[np.ndarray] = []
    seq_rows: list[np.ndarray] = []
    described: list[str] = []
    n_chunks = n_tokens = n_bytes = doc_id = 0
    pending: list[Document] = []

    full = False

    def flush() -> None:
        nonlocal n_chunks, n_tokens, n_bytes, doc_id, full
        encoded = tokenizer([d.text for d in pending], add_special_tokens=False)["input_ids"]
        for document, ids in zip(pending, encoded):
            tokens = np.asarray([sod, *ids, eod], dtype=np.int32)
            count = -(-len(tokens) // m)
            if max_chunks and n_chunks + count > max_chunks:
                full = True
                break
            padded = np.full(count * m + 1, PAD, dtype=np.int32)
            padded[: len(tokens)] = tokens
            rows = np.lib.stride_tricks.sliding_window_view(padded, m + 1)[::m].copy()
            chunk_rows.append(rows)
            doc_rows.append(np.full(count, doc_id, dtype=np.int32))
            seq_rows.append(n_chunks + np.arange(0, count, seq_len // m, dtype=np.int64))
            size = len(document.text.encode("utf-8"))
            described.append(json.dumps({"doc": doc_id, "source": document.source, "tokens": int(len(tokens)),
                                         "bytes": size, "first_chunk": n_chunks, "chunks": count}))
            n_chunks += count
            n_tokens += len(tokens)
            n_bytes += size
            doc_id += 1
        pending.clear()

    for document in documents:
        if document.text.strip():
            pending.append(document)
        if len(pending) >= batch:
            flush()
        if full:
            break
    if pending and not full:
        flush()
    if doc_id == 0 and full:
        raise InputError(Location(where), f"the first document alone is more than --max-chunks {max_chunks} chunks")
    if doc_id == 0:
        raise InputError(Location(where), "no text: every document is empty")
    if n_tokens - 2 * doc_id < m:  # not counting the start and end tokens
        raise InputError(Location(where), f"text shorter than a chunk: {n_tokens - 2 * doc_id} tokens in all, "
                         f"chunk size {m}", hint="Add text, or lower --chunk-size.")
    out.mkdir(parents=True, exist_ok=True)
    _write_npy(out / "chunks.npy", np.concatenate(chunk_rows))
    _write_npy(out / "doc_ids.npy", np.concatenate(doc_rows))
    _write_npy(out / "seq_starts.npy", np.concatenate(seq_rows))
    with atomic_open(out / "documents.jsonl") as handle:
        handle.write("\n".join(described) + "\n")
    return ChunkStats(doc_id, n_tokens, n_chunks, sum(len(s) for s in seq_rows), n_bytes)


def chunk_texts(chunks: np.ndarray, tokenizer: Any, chunk_size: int) -> list[str]:
    """The text of each chunk (its m tokens, padding and special tokens left out): what the embedder reads."""
    return [tokenizer.decode([int(t) for t in row[:chunk_size] if t >= 0], skip_special_tokens=True) for row in chunks]


# -- stage 2: embeddings ---------------------------------------------------------------------------
def embed_chunks(folder: Path, tokenizer: Any, encoder: Any, *, chunk_size: int, batch_size: int = 64,
                 block: int = 4096) -> int:
    """embeddings.npy (C, dim) float32 with the ragkit embedder; streamed in blocks into a memmap."""
    chunks = np.load(folder / "chunks.npy", mmap_mode="r")
    tmp = folder / ".embeddings.npy.tmp"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(chunks), encoder.info.dim))
    with progress(transient=True) as bar:
        task = bar.add_task("embed chunks", total=len(chunks), rate="")
        for start in range(0, len(chunks), block):
            texts = chunk_texts(chunks[start:start + block], tokenizer, chunk_size)
            out[start:start + len(texts)] = encoder.encode(texts, batch_size=batch_size)
            bar.advance(task, len(texts))
    out.flush()
    del out
    os.replace(tmp, folder / "embeddings.npy")
    return len(chunks)


# -- stage 3: index ----------------------------------------------------------------------------------
def index_chunks(folder: Path, tokenizer: Any, encoder_info: Any, *, chunk_size: int, spec: str,
                 device: str = "cpu", max_memory: int | None = None) -> Path:
    """The ragkit index over the chunk embeddings (passage id = chunk row, text = the chunk's text), built
    in a staging folder and swapped in whole."""
    import shutil

    from ragkit.index import Index
    from ragkit.io.corpus import Passage

    chunks = np.load(folder / "chunks.npy", mmap_mode="r")
    vectors = np.load(folder / "embeddings.npy", mmap_mode="r")
    texts = chunk_texts(chunks, tokenizer, chunk_size)
    passages = [Passage(id=str(i), text=t) for i, t in enumerate(texts)]
    staging, final = folder / ".index.tmp", folder / "index"
    shutil.rmtree(staging, ignore_errors=True)
    Index.build(staging, passages, np.ascontiguousarray(vectors), encoder_info, spec=spec, device=device,
                max_memory=max_memory)
    old = folder / ".index.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


# -- stage 4: neighbours -----------------------------------------------------------------------------
def search_chunk_ids(index: Any, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) chunk rows of the top-k hits, -1 where there are fewer."""
    out = np.full((len(queries), k), PAD, dtype=np.int64)
    for row, hits in enumerate(index.search_ids(queries, k)):
        for col, (chunk_id, _) in enumerate(hits):
            out[row, col] = int(chunk_id)
    return out


def drop_same_document(candidates: np.ndarray, query_docs: np.ndarray, doc_ids: np.ndarray, k: int) -> np.ndarray:
    """Keep, in rank order, the first k candidates from another document than the query's (which also
    drops the query chunk itself); -1 fills rows with fewer."""
    out = np.full((len(candidates), k), PAD, dtype=np.int32)
    safe = np.where(candidates >= 0, candidates, 0)
    keep = (candidates >= 0) & (doc_ids[safe] != query_docs[:, None])
    for row in range(len(candidates)):
        chosen = candidates[row][keep[row]][:k]
        out[row, : len(chosen)] = chosen
    return out


def compute_neighbours(queries_folder: Path, index: Any, corpus_doc_ids: np.ndarray, *, k: int, extra: int,
                       exclude_same_document: bool, block: int = 1024) -> int:
    """neighbours.npy (C, k) int32 for the chunks in `queries_folder`, searched in `index`."""
    vectors = np.load(queries_folder / "embeddings.npy", mmap_mode="r")
    query_docs = np.load(queries_folder / "doc_ids.npy", mmap_mode="r")
    fetch = k + extra + 1 if exclude_same_document else k
    out = np.full((len(vectors), k), PAD, dtype=np.int32)
    with progress(transient=True) as bar:
        task = bar.add_task("neighbours", total=len(vectors), rate="")
        for start in range(0, len(vectors), block):
            q = np.ascontiguousarray(vectors[start:start + block])
            found = search_chunk_ids(index, q, fetch)
            if exclude_same_document:
                out[start:start + len(q)] = drop_same_document(found, np.asarray(query_docs[start:start + len(q)]),
                                                               corpus_doc_ids, k)
            else:
                out[start:start + len(q)] = found[:, :k]
            bar.advance(task, len(q))
    _write_npy(queries_folder / "neighbours.npy", out)
    return len(out)
