"""The prepared RETRO corpus: `prepare` runs the pipeline stages that are out of date, `RetroCorpus` reads
the memmaps, `RetroSequences` yields training / evaluation sequences with their neighbours."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ragkit.console import info
from ragkit.errors import ResourceError, UsageError
from ragkit.archs.retro import pipeline as P


class RetroCorpus:
    """Read-only view of one prepared folder: chunk tokens, document ids, sequence starts, and (when
    computed) each chunk's neighbours in the retrieval corpus."""

    def __init__(self, folder: str | Path, *, chunk_size: int) -> None:
        self.folder = Path(folder)
        self.chunk_size = chunk_size
        self.chunks = np.load(self.folder / "chunks.npy", mmap_mode="r")
        self.doc_ids = np.load(self.folder / "doc_ids.npy", mmap_mode="r")
        self.seq_starts = np.load(self.folder / "seq_starts.npy", mmap_mode="r")
        path = self.folder / "neighbours.npy"
        self.neighbours = np.load(path, mmap_mode="r") if path.exists() else None
        if self.chunks.shape[1] != chunk_size + 1:
            raise ResourceError(f"{self.folder}/chunks.npy holds chunks of {self.chunks.shape[1] - 1} tokens, "
                                f"not {chunk_size}")

    def __len__(self) -> int:
        return len(self.chunks)

    def documents(self) -> list[dict[str, Any]]:
        with open(self.folder / "documents.jsonl", encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def neighbour_tokens(self, ids: np.ndarray) -> np.ndarray:
        """(..., K) chunk rows -> (..., K, 2m) tokens: the neighbour chunk and its continuation (the next
        chunk of the same document, else padding); -1 rows give all padding."""
        m = self.chunk_size
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)
        out = np.full((len(flat), 2 * m), P.PAD, dtype=np.int64)
        valid = flat >= 0
        rows = flat[valid]
        out[valid, :m] = self.chunks[rows, :m]
        following = np.minimum(flat + 1, len(self.chunks) - 1)
        same_doc = valid & (flat + 1 < len(self.chunks))
        same_doc[valid] &= self.doc_ids[following[valid]] == self.doc_ids[rows]
        out[same_doc, m:] = self.chunks[following[same_doc], :m]
        return out.reshape(*ids.shape, 2 * m)


@dataclass
class Prepared:
    corpus: RetroCorpus
    tokenizer: Any
    tokenizer_fingerprint: str
    encoder: Any  # the ragkit Encoder that embedded the chunks (and embeds new ones at generation)
    index_dir: Path


CHUNK_FILES = ["chunks.npy", "doc_ids.npy", "seq_starts.npy", "documents.jsonl"]


def prepare(config: P.RetroDataConfig) -> Prepared:
    """Build (or reuse) every stage under config.workdir; returns the training corpus."""
    config.validate()
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    manifest = P.Manifest(workdir)
    from ragkit.archs.retro.import_memmaps import imported_stage

    if imported_stage(manifest, "chunks") is not None:  # `ragkit retro import`: RETRO-pytorch's chunks, as they are
        chunk_key, tokenizer, fingerprint = _imported_chunks(manifest, config)
        force = False
    else:
        files = P.input_files(config.data, config.glob)
        tokenizer = P.load_tokenizer(config.tokenizer)
        fingerprint = P.tokenizer_fingerprint(tokenizer)
        check_tokenizer(manifest, fingerprint, config.tokenizer, reprocess=config.reprocess)
        chunk_params = {"format_version": P.FORMAT_VERSION, "input": P.files_digest(files),
                        "files": [str(f.resolve()) for f in files],
                        "tokenizer": config.tokenizer, "tokenizer_fingerprint": fingerprint,
                        "chunk_size": config.chunk_size, "seq_len": config.seq_len,
                        **({"max_chunks": config.max_chunks} if config.max_chunks else {})}
        chunk_key, force = chunk_stage(manifest, chunk_params, files, tokenizer, where=str(config.data),
                                       force=config.reprocess)

    from ragkit.models.encoder import Encoder

    encoder = Encoder(config.embedder, device=config.device)
    embed_params = {"chunks": chunk_key, "embedder": config.embedder, "fingerprint": encoder.info.fingerprint,
                    "normalize": encoder.info.normalize}
    embed_key = P.stage_key(embed_params)
    if force or not manifest.is_current("embeddings", embed_key):
        began = time.perf_counter()
        P.embed_chunks(workdir, tokenizer, encoder, chunk_size=config.chunk_size, batch_size=config.embed_batch_size)
        manifest.record("embeddings", embed_key, embed_params, ["embeddings.npy"], seconds=time.perf_counter() - began)
        force = True  # everything downstream is stale

    index_params = {"embeddings": embed_key, "spec": config.index_spec,
                    **({"max_memory": config.max_index_memory} if config.max_index_memory else {})}
    index_key = P.stage_key(index_params)
    if force or not manifest.is_current("index", index_key):
        began = time.perf_counter()
        P.index_chunks(workdir, tokenizer, encoder.info, chunk_size=config.chunk_size, spec=config.index_spec,
                       device=encoder.device, max_memory=config.max_index_memory)
        manifest.record("index", index_key, index_params, ["index"], seconds=time.perf_counter() - began)
        force = True

    neighbour_params = {"index": index_key, "k": config.num_neighbors, "extra": config.extra_neighbors,
                        "exclude_same_document": True}
    neighbour_key = P.stage_key(neighbour_params)
    imported_knn = imported_stage(manifest, "neighbours")
    if imported_knn is not None:  # RETRO-pytorch's own neighbours are what the model trains with
        k = manifest.stage("neighbours")["params"]["k"]
        if k != config.num_neighbors:
            raise UsageError(f"--num-neighbors {config.num_neighbors}: {workdir} holds {k} neighbours per chunk, "
                             "imported from RETRO-pytorch", hint=f"Train with --num-neighbors {k}.")
    elif force or not manifest.is_current("neighbours", neighbour_key):
        from ragkit.index import Index

        began = time.perf_counter()
        index = Index.open(workdir / "index")
        P.compute_neighbours(workdir, index, np.load(workdir / "doc_ids.npy"), k=config.num_neighbors,
                             extra=config.extra_neighbors, exclude_same_document=True)
        manifest.record("neighbours", neighbour_key, neighbour_params, ["neighbours.npy"],
                        seconds=time.perf_counter() - began)
    corpus = RetroCorpus(workdir, chunk_size=config.chunk_size)
    return Prepared(corpus, tokenizer, fingerprint, encoder, workdir / "index")


def _imported_chunks(manifest: P.Manifest, config: P.RetroDataConfig) -> tuple[str, Any, str]:
    """The chunks stage of an imported work folder: (its key, the tokenizer, its fingerprint), checked
    against the run's settings; never rebuilt from --data (there is no text to rebuild it from)."""
    workdir = manifest.workdir
    entry = manifest.stage("chunks")
    assert entry is not None
    params = entry["params"]
    if config.reprocess:
        raise UsageError(f"--reprocess: {workdir} was imported from RETRO-pytorch's memmaps; import them again "
                         "(ragkit retro import) to rebuild it")
    if Path(config.data).resolve() != workdir.resolve():
        raise UsageError(f"--data {config.data}: {workdir} was imported from RETRO-pytorch and is its own data",
                         hint=f"Give --data {workdir} (the same folder as --workdir).")
    for name, ours in (("chunk_size", config.chunk_size), ("seq_len", config.seq_len)):
        if params[name] != ours:
            raise UsageError(f"--{name.replace('_', '-')} {ours}: {workdir} was imported with {params[name]}")
    tokenizer = P.load_tokenizer(config.tokenizer)
    fingerprint = P.tokenizer_fingerprint(tokenizer)
    if fingerprint != params["tokenizer_fingerprint"]:
        raise ResourceError(f"--tokenizer {config.tokenizer}: not the tokenizer {workdir} was imported with "
                            f"('{params['tokenizer']}')", hint=f"Train with --tokenizer {params['tokenizer']}.")
    if not manifest.is_current("chunks", entry["key"]):
        raise ResourceError(f"{workdir}: an imported file is missing or changed", hint="Import it again.")
    return entry["key"], tokenizer, fingerprint


def chunk_stage(manifest: P.Manifest, params: dict[str, Any], files: list[Path], tokenizer: Any, *, where: str,
                force: bool) -> tuple[str, bool]:
    """The chunks stage of a work folder (or of held-out text): (its key, whether it was rebuilt)."""
    key = P.stage_key(params)
    if not force and manifest.is_current("chunks", key):
        return key, False
    if not P.keeps_newlines(tokenizer):
        who = f"'{params['tokenizer']}'" if "tokenizer" in params else "in use"
        info(f"warning: the tokenizer {who} drops line breaks; the model will never write one")
    began = time.perf_counter()
    stats = P.chunk_documents(P.read_documents(files), tokenizer, manifest.workdir, chunk_size=params["chunk_size"],
                              seq_len=params["seq_len"], where=where, max_chunks=params.get("max_chunks", 0))
    manifest.record("chunks", key, params, CHUNK_FILES, stats=stats.__dict__, seconds=time.perf_counter() - began)
    info(f"retro: {stats.documents} documents -> {stats.chunks} chunks of {params['chunk_size']} tokens, "
         f"{stats.sequences} sequences")
    return key, True


def check_tokenizer(manifest: P.Manifest, fingerprint: str, name: str, *, reprocess: bool) -> None:
    """A work folder tokenized with one tokenizer is never silently re-tokenized with another: models
    trained on it read its ids. --reprocess rebuilds it on purpose."""
    entry = manifest.stage("chunks")
    if entry is None or reprocess:
        return
    built = entry["params"]["tokenizer_fingerprint"]
    if built != fingerprint:
        raise ResourceError(
            f"{manifest.path}: chunks were tokenized with '{entry['params']['tokenizer']}' (fingerprint "
            f"{built[:12]}), not '{name}' ({fingerprint[:12]})",
            hint="Use the same --tokenizer, pass --reprocess to rebuild the work folder, or use another --workdir.")


def prepare_heldout(data: str, glob: str, workdir: str | Path, tokenizer: Any, fingerprint: str, *, chunk_size: int,
                    seq_len: int, retriever: Any = None) -> RetroCorpus:
    """Chunk held-out text with the work folder's tokenizer and, with a `ChunkRetriever` over the work
    folder, find each chunk's neighbours in its index (no same-document filter: held-out documents are not
    in it). Cached under WORKDIR/heldout/<key>/ with the same manifest rules."""
    files = P.input_files(data, glob)
    params = {"format_version": P.FORMAT_VERSION, "input": P.files_digest(files), "tokenizer_fingerprint": fingerprint,
              "chunk_size": chunk_size, "seq_len": seq_len}
    folder = Path(workdir) / "heldout" / P.stage_key(params)[:16]
    folder.mkdir(parents=True, exist_ok=True)
    manifest = P.Manifest(folder)
    key, _ = chunk_stage(manifest, params, files, tokenizer, where=data, force=False)
    if retriever is not None:
        built = P.Manifest(Path(workdir)).stage("index")
        nkey = P.stage_key({"chunks": key, "index": built["key"] if built else None, "k": retriever.k})
        if not manifest.is_current("neighbours", nkey):
            P.embed_chunks(folder, tokenizer, retriever.encoder, chunk_size=chunk_size)
            P.compute_neighbours(folder, retriever.index, np.empty(0, dtype=np.int32), k=retriever.k, extra=0,
                                 exclude_same_document=False)
            manifest.record("neighbours", nkey, {"k": retriever.k}, ["embeddings.npy", "neighbours.npy"])
    return RetroCorpus(folder, chunk_size=chunk_size)


class RetroSequences(Dataset):
    """Training sequences: seq_len tokens from a sequence start, cut at the document's end (the rest is
    padding, never a second document: CCA would mix them), with each chunk's K neighbours of 2m tokens
    taken from `neighbour_source` (the retrieval corpus)."""

    def __init__(self, corpus: RetroCorpus, neighbour_source: RetroCorpus | None, *, seq_len: int, pad_id: int,
                 with_neighbours: bool = True, max_seqs: int | None = None) -> None:
        self.corpus, self.source = corpus, neighbour_source
        self.count = len(corpus.seq_starts) if max_seqs is None else min(max_seqs, len(corpus.seq_starts))
        self.seq_chunks = seq_len // corpus.chunk_size
        self.pad_id = pad_id
        self.with_neighbours = with_neighbours and neighbour_source is not None and corpus.neighbours is not None

    def __len__(self) -> int:
        return self.count

    def rows(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(S, m + 1) tokens and the chunk rows they came from (-1 for padding chunks)."""
        c = self.corpus
        start = int(c.seq_starts[i])
        stop = min(start + self.seq_chunks, len(c))
        doc = c.doc_ids[start]
        rows = np.arange(start, start + self.seq_chunks)
        rows[stop - start:] = -1
        rows[: stop - start][np.asarray(c.doc_ids[start:stop]) != doc] = -1
        tokens = np.full((self.seq_chunks, c.chunk_size + 1), P.PAD, dtype=np.int64)
        tokens[rows >= 0] = c.chunks[rows[rows >= 0]]
        return tokens, rows

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.item(*self.rows(i))

    def item(self, tokens: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The training item of a sequence from its `rows(i)` (callers that also need the rows read them once)."""
        m = self.corpus.chunk_size
        ids = tokens[:, :m].reshape(-1)
        item = {"input_ids": np.where(ids >= 0, ids, self.pad_id), "labels": np.where(ids >= 0, ids, -100)}
        if self.with_neighbours:
            assert self.corpus.neighbours is not None and self.source is not None
            neighbour_ids = np.full((self.seq_chunks, self.corpus.neighbours.shape[1]), P.PAD, dtype=np.int64)
            neighbour_ids[rows >= 0] = self.corpus.neighbours[rows[rows >= 0]]
            item["retrieved"] = self.source.neighbour_tokens(neighbour_ids)
        return item


def collate(rows: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    import torch

    return {key: torch.as_tensor(np.stack([r[key] for r in rows])) for key in rows[0]}
