"""Import a corpus prepared by RETRO-pytorch (its raw int32 memmaps) into a ragkit RETRO work folder, so a
user can train ragkit's RETRO on it without re-chunking.

RETRO-pytorch writes, with no header (the shapes are its `max_chunks` / `max_seqs`, the used rows its
returned stats):

    train.chunks.dat        int32 (max_chunks, chunk_size + 1)   tokens, and the next chunk's first; pad 0
    train.seq.dat           int32 (max_seqs,)                    the first chunk of each training sequence
    train.doc_ids.dat       int32 (max_chunks,)                  each chunk's document
    train.chunks.knn.dat    int32 (num_chunks, K)                each chunk's neighbours, -1 when missing

ragkit's layout (docs/retro.md) differs in two ways handled here: padding is -1, not the tokenizer's pad id,
and files are .npy. The neighbours are kept as RETRO-pytorch computed them (the manifest says so, and
`prepare` does not recompute them); the embeddings and the ragkit index, which generation and held-out
evaluation search, are built with a ragkit embedder over the chunks' text."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ragkit.archs.retro import pipeline as P
from ragkit.errors import InputError, Location, ResourceError, UsageError
from ragkit.io.atomic import atomic_open, sha256_file

SOURCE = "RETRO-pytorch"


@dataclass(frozen=True)
class MemmapPaths:
    chunks: Path
    seqs: Path
    doc_ids: Path
    knn: Path | None

    @classmethod
    def beside(cls, chunks: Path, *, seqs: Path | None = None, doc_ids: Path | None = None,
               knn: Path | None = None) -> "MemmapPaths":
        """RETRO-pytorch's names next to `chunks` (X.chunks.dat -> X.seq.dat, X.doc_ids.dat, X.chunks.knn.dat)."""
        name = chunks.name
        prefix = name[: -len(".chunks.dat")] if name.endswith(".chunks.dat") else chunks.stem
        default_knn = chunks.parent / f"{chunks.stem}.knn{chunks.suffix}"
        return cls(chunks, seqs or chunks.parent / f"{prefix}.seq.dat", doc_ids or chunks.parent / f"{prefix}.doc_ids.dat",
                   knn if knn is not None else (default_knn if default_knn.exists() else None))


def _rows(path: Path, row_bytes: int, at_least: int, what: str) -> int:
    if not path.is_file():
        raise ResourceError(f"{path}: no such file ({what})")
    size = path.stat().st_size
    if size % row_bytes or size // row_bytes < at_least:
        raise InputError(Location(str(path)), f"{size} bytes is not {at_least} or more rows of {row_bytes} bytes "
                         f"({what}); check --num-chunks / --num-seqs / --chunk-size")
    return size // row_bytes


def import_memmaps(paths: MemmapPaths, workdir: Path, *, num_chunks: int, num_seqs: int, chunk_size: int,
                   seq_len: int, tokenizer_name: str, embedder: str = "minilm", index_spec: str = "flat",
                   pad_id: int = 0, device: str | None = None) -> dict[str, Any]:
    """Write WORKDIR in ragkit's layout from RETRO-pytorch's memmaps; returns what was imported."""
    from ragkit.models.encoder import Encoder

    if num_chunks < 1 or num_seqs < 1:
        raise UsageError("--num-chunks and --num-seqs (RETRO-pytorch's stats) must be positive")
    if seq_len % chunk_size:
        raise UsageError(f"--seq-len {seq_len} must be a multiple of --chunk-size {chunk_size}")
    m = chunk_size
    _rows(paths.chunks, (m + 1) * 4, num_chunks, "chunks: int32 rows of chunk_size + 1")
    _rows(paths.doc_ids, 4, num_chunks, "doc ids: one int32 per chunk")
    _rows(paths.seqs, 4, num_seqs, "sequence starts: one int32 per sequence")
    chunks = np.array(np.memmap(paths.chunks, dtype=np.int32, mode="r")[: num_chunks * (m + 1)]).reshape(num_chunks, m + 1)
    doc_ids = np.array(np.memmap(paths.doc_ids, dtype=np.int32, mode="r")[:num_chunks])
    seq_starts = np.array(np.memmap(paths.seqs, dtype=np.int32, mode="r")[:num_seqs]).astype(np.int64)
    if (np.diff(doc_ids) < 0).any() or doc_ids[0] < 0:
        raise InputError(Location(str(paths.doc_ids)), "document ids must start at 0 or more and never decrease "
                         "(each document's chunks are contiguous)")
    if (seq_starts < 0).any() or (seq_starts >= num_chunks).any():
        raise InputError(Location(str(paths.seqs)), f"a sequence starts outside the {num_chunks} chunks")
    tokenizer = P.load_tokenizer(tokenizer_name)
    if chunks.max() >= len(tokenizer) or chunks.min() < 0:
        raise InputError(Location(str(paths.chunks)), f"token ids up to {int(chunks.max())} do not fit the tokenizer "
                         f"'{tokenizer_name}' ({len(tokenizer)} tokens): give the tokenizer RETRO-pytorch used")
    chunks[chunks == pad_id] = P.PAD  # ragkit pads with -1: a pad id is never a token it reads
    neighbours = None
    if paths.knn is not None:
        k_bytes = _rows(paths.knn, 4, num_chunks, "neighbours: int32 (num_chunks, K)")
        if k_bytes % num_chunks:
            raise InputError(Location(str(paths.knn)), f"{k_bytes * 4} bytes is not {num_chunks} rows of K int32")
        neighbours = np.array(np.memmap(paths.knn, dtype=np.int32, mode="r")).reshape(num_chunks, k_bytes // num_chunks)
        if (neighbours < -1).any() or (neighbours >= num_chunks).any():
            raise InputError(Location(str(paths.knn)), f"neighbour rows must be -1 or below {num_chunks}")

    workdir.mkdir(parents=True, exist_ok=True)
    manifest = P.Manifest(workdir)
    P._write_npy(workdir / "chunks.npy", chunks)
    P._write_npy(workdir / "doc_ids.npy", doc_ids)
    P._write_npy(workdir / "seq_starts.npy", seq_starts)
    starts = np.flatnonzero(np.r_[True, doc_ids[1:] != doc_ids[:-1]])
    ends = np.r_[starts[1:], num_chunks]
    with atomic_open(workdir / "documents.jsonl") as handle:
        for first, stop in zip(starts.tolist(), ends.tolist()):
            tokens = int((chunks[first:stop, :m] != P.PAD).sum())
            handle.write(json.dumps({"doc": int(doc_ids[first]), "source": f"{paths.chunks.name} (RETRO-pytorch)",
                                     "tokens": tokens, "bytes": 0, "first_chunk": first, "chunks": stop - first}) + "\n")
    fingerprint = P.tokenizer_fingerprint(tokenizer)
    imported = {"from": SOURCE, "chunks": str(paths.chunks.resolve()), "chunks_sha256": sha256_file(paths.chunks),
                "num_chunks": num_chunks, "num_seqs": num_seqs, "pad_id": pad_id}
    chunk_params = {"format_version": P.FORMAT_VERSION, "imported": imported, "tokenizer": tokenizer_name,
                    "tokenizer_fingerprint": fingerprint, "chunk_size": m, "seq_len": seq_len}
    chunk_key = P.stage_key(chunk_params)
    manifest.record("chunks", chunk_key, chunk_params, ["chunks.npy", "doc_ids.npy", "seq_starts.npy", "documents.jsonl"],
                    stats={"documents": len(starts), "chunks": num_chunks, "sequences": num_seqs})
    began = time.perf_counter()
    encoder = Encoder(embedder, device=device)
    embed_params = {"chunks": chunk_key, "embedder": embedder, "fingerprint": encoder.info.fingerprint,
                    "normalize": encoder.info.normalize}
    embed_key = P.stage_key(embed_params)
    P.embed_chunks(workdir, tokenizer, encoder, chunk_size=m)
    manifest.record("embeddings", embed_key, embed_params, ["embeddings.npy"], seconds=time.perf_counter() - began)
    index_params = {"embeddings": embed_key, "spec": index_spec}
    index_key = P.stage_key(index_params)
    P.index_chunks(workdir, tokenizer, encoder.info, chunk_size=m, spec=index_spec, device=encoder.device)
    manifest.record("index", index_key, index_params, ["index"])
    if neighbours is not None:
        P._write_npy(workdir / "neighbours.npy", neighbours)
        knn_params = {"imported": {"from": SOURCE, "knn": str(paths.knn.resolve()), "sha256": sha256_file(paths.knn)},
                      "k": int(neighbours.shape[1])}
        manifest.record("neighbours", P.stage_key(knn_params), knn_params, ["neighbours.npy"])
    return {"workdir": str(workdir), "documents": len(starts), "chunks": num_chunks, "sequences": num_seqs,
            "neighbours": None if neighbours is None else int(neighbours.shape[1]), "tokenizer": tokenizer_name,
            "embedder": embedder}


def imported_stage(manifest: P.Manifest, name: str) -> dict[str, Any] | None:
    """The `imported` record of a stage that came from RETRO-pytorch, else None."""
    entry = manifest.stage(name)
    return (entry or {}).get("params", {}).get("imported")
