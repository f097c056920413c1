"""Embedding shards: what `ragkit embed` writes and `ragkit index build --embeddings` reads.

    DIR/embeddings-00000-of-00004.npy     float16/float32 (rows, dim), row i embeds passage i
    DIR/passages-00000-of-00004.jsonl     the shard's passages (id, title, text, other fields)
    DIR/shard-00000-of-00004.json         written last: model, fingerprint, dim, dtype, rows, range

Sharding follows the Self-RAG passage-embedding script: shard i of n takes rows
[i·⌊N/n⌋, (i+1)·⌊N/n⌋), and the last shard also takes the remainder.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ragkit.errors import InputError, Location, ResourceError, UsageError
from ragkit.io.atomic import disk_full, names_full_disk, write_json
from ragkit.io.corpus import Passage, iter_passages_with_lines, resolve_corpus_path
from ragkit.io.mapped import drop_pages
from ragkit.index.builder import finite_rows
from ragkit.index.encoder_info import EncoderInfo
from ragkit.models.encoder import Encoder

DTYPES = ("float16", "float32")
_SHARD_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.json$")


def shard_bounds(n: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise UsageError(f"--shard-id {shard_id} --num-shards {num_shards}: need 0 <= shard-id < num-shards")
    size = n // num_shards
    start = shard_id * size
    end = n if shard_id == num_shards - 1 else start + size
    return start, end


def _names(shard_id: int, num_shards: int) -> tuple[str, str, str]:
    tag = f"{shard_id:05d}-of-{num_shards:05d}"
    return f"embeddings-{tag}.npy", f"passages-{tag}.jsonl", f"shard-{tag}.json"


@dataclass
class ShardResult:
    rows: int
    start: int
    end: int
    seconds: float
    paths: list[Path]
    resumed_from: int = 0  # rows found done by an earlier, interrupted run


CHECKPOINT_ROWS = 4096  # passages embedded between two checkpoints of `ragkit embed`
EMBED_BLOCK = 4096  # passages read, embedded and stored at a time by `build_index` (`index build CORPUS`)


def embed_corpus_into(build: Any, encoder: Encoder, corpus: str | Path, *, batch_size: int = 64,
                      on_block: Callable[[int], None] | None = None) -> int:
    """Stream a corpus into an open `Index.create` build: read a block, embed it, store it, so the corpus
    is never held whole. `on_block(n)` after each block; returns the passages added."""
    block: list[Passage] = []
    lines: list[int] = []
    added = 0

    def flush() -> None:
        nonlocal added
        build.add(block, encoder.encode([p.embedding_text() for p in block], batch_size=batch_size), lines=lines)
        added += len(block)
        if on_block is not None:
            on_block(len(block))
        block.clear()
        lines.clear()

    for lineno, passage in iter_passages_with_lines(corpus):
        block.append(passage)
        lines.append(lineno)
        if len(block) >= EMBED_BLOCK:
            flush()
    if block:
        flush()
    return added


def build_index(output: str | Path, corpus: str | Path, encoder: Encoder, *, batch_size: int = 64,
                on_block: Callable[[int], None] | None = None, query_encoder: Encoder | None = None,
                **options: Any) -> Any:
    """`ragkit index build CORPUS`: an index of a corpus file (JSONL, BEIR folder, DPR TSV, or '-'), embedded
    with `encoder` as it streams (`query_encoder`: a separate model for its queries, e.g. DPR's question
    encoder); options as `Index.create` (spec, metric, max_memory, overwrite, sparse, ...)."""
    from ragkit.index import Index
    from ragkit.io.jsonl import display_name
    from ragkit.models.encoder import with_query_encoder

    record = with_query_encoder(encoder.info, query_encoder)
    with Index.create(output, record, source=display_name(resolve_corpus_path(corpus)), **options) as build:
        embed_corpus_into(build, encoder, corpus, batch_size=batch_size, on_block=on_block)
    return build.index


def count_passages(corpus: str | Path) -> int:
    """Rows of a corpus file, read once without keeping them (a shard needs N to know its range). An id that
    appears twice is refused here, naming its line and the first's: `index build --embeddings` refuses it
    too, but only after every shard was embedded. Ids are kept as 8-byte hashes (168 MB at 21M rows); a
    repeated hash is confirmed against the ids themselves by a second read."""
    from array import array

    hashes = array("q")
    for _, passage in iter_passages_with_lines(corpus):
        hashes.append(hash(passage.id))
    ordered = np.sort(np.frombuffer(hashes, dtype=np.int64)) if len(hashes) else np.zeros(0, np.int64)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if len(repeated):
        _refuse_repeated_id(corpus, set(repeated.tolist()))
    return len(hashes)


def _refuse_repeated_id(corpus: str | Path, hashes: set[int]) -> None:
    from ragkit.io.jsonl import display_name

    first: dict[str, int] = {}
    for line, passage in iter_passages_with_lines(corpus):
        if hash(passage.id) in hashes:
            if passage.id in first:
                raise InputError(Location(display_name(corpus), line, "id"),
                                 f"duplicate id '{passage.id}' (first at line {first[passage.id]})")
            first[passage.id] = line


def _identity(corpus: str | Path, encoder: Encoder, shard: tuple[int, int], dtype: str, block: int,
              n: int) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one for its output to be the same bytes."""
    path = Path(resolve_corpus_path(corpus))
    stat = path.stat()
    return {"corpus": str(path.resolve()), "corpus_bytes": stat.st_size, "corpus_mtime_ns": stat.st_mtime_ns,
            "corpus_rows": n, "encoder": encoder.info.to_json(), "shard": list(shard), "dtype": dtype, "block": block}


def embed_shard(
    encoder: Encoder,
    corpus: str | Path,
    out_dir: str | Path,
    *,
    shard_id: int = 0,
    num_shards: int = 1,
    dtype: str = "float16",
    batch_size: int = 64,
    checkpoint_rows: int = CHECKPOINT_ROWS,
    on_block: Callable[[int], None] | None = None,
    on_plan: Callable[[int, int], None] | None = None,
    corpus_rows: int | None = None,
) -> ShardResult:
    """Embed one shard of a corpus file, streaming: only its own rows' passages are kept, a block at a
    time, and the vectors go straight into the .npy on disk. Every `checkpoint_rows` passages the files are
    flushed and a progress file records how far they are complete, so a run killed at any moment and
    started again with the same arguments continues from its last checkpoint and writes the same bytes
    as an uninterrupted run (blocks start at the same rows, so the encoder sees the same batches)."""
    import time

    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if str(corpus) == "-":
        raise UsageError("ragkit embed reads a corpus file (it is read twice, and again on resume), not stdin")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = count_passages(corpus) if corpus_rows is None else corpus_rows  # given when shards run in parallel
    start, end = shard_bounds(n, shard_id, num_shards)
    rows = end - start
    emb_name, psg_name, meta_name = _names(shard_id, num_shards)
    emb_part, psg_part = out / f".{emb_name}.partial", out / f".{psg_name}.partial"
    progress_path = out / f".progress-{shard_id:05d}-of-{num_shards:05d}.json"
    identity = _identity(corpus, encoder, (start, end), dtype, checkpoint_rows, n)
    done, text_bytes = 0, 0
    if progress_path.exists() and emb_part.exists() and psg_part.exists():
        progress = json.loads(progress_path.read_text(encoding="utf-8"))
        if progress.get("identity") == identity:
            done, text_bytes = int(progress["rows_done"]), int(progress["passages_bytes"])
    with names_full_disk(out, kept="nothing was embedded"):
        vectors = _open_shard(emb_part, psg_part, rows, done, (rows, encoder.info.dim), dtype)
    if rows and not _reserved(emb_part):
        vectors = None
        if done == 0:  # nothing written yet: leave nothing behind
            for leftover in (emb_part, psg_part, progress_path):
                leftover.unlink(missing_ok=True)
        kept = "nothing was kept" if done == 0 else f"the {done} rows embedded so far are kept: rerun to resume"
        raise disk_full(out, kept, writing=f"{emb_name} ({rows} x {encoder.info.dim} {dtype})")
    if on_plan is not None:
        on_plan(rows, done)
    began = time.perf_counter()
    kept = "the rows embedded before it are kept: rerun to resume"
    with names_full_disk(out, kept=kept), open(psg_part, "r+b") as texts:
        texts.truncate(text_bytes)  # what an interrupted run wrote past its last checkpoint goes
        texts.seek(text_bytes)
        block: list[Passage] = []
        row = done

        def flush() -> None:
            nonlocal row, text_bytes
            vectors[row : row + len(block)] = encoder.encode([p.embedding_text() for p in block], batch_size=batch_size)
            for p in block:
                texts.write((json.dumps(p.to_json(), ensure_ascii=False) + "\n").encode("utf-8"))
            row += len(block)
            vectors.flush()
            drop_pages(vectors)  # written back: memory stays one block, whatever the shard's size
            texts.flush()
            os.fsync(texts.fileno())
            text_bytes = texts.tell()
            write_json(progress_path, {"identity": identity, "rows_done": row, "passages_bytes": text_bytes})
            if on_block is not None:
                on_block(len(block))
            block.clear()

        for i, (_, passage) in enumerate(iter_passages_with_lines(corpus)):
            if i < start + done:
                continue
            if i >= end:
                break
            block.append(passage)
            if len(block) == checkpoint_rows:
                flush()
        if block:
            flush()
    vectors = None  # unmapped before the rename
    os.replace(emb_part, out / emb_name)
    os.replace(psg_part, out / psg_name)
    write_json(
        out / meta_name,
        {
            "encoder": encoder.info.to_json(),
            "dtype": dtype,
            "rows": rows,
            "corpus_rows": n,
            "range": [start, end],
            "shard_id": shard_id,
            "num_shards": num_shards,
            "embeddings": emb_name,
            "passages": psg_name,
        },
    )
    progress_path.unlink(missing_ok=True)
    return ShardResult(rows, start, end, time.perf_counter() - began, [out / emb_name, out / psg_name, out / meta_name],
                       resumed_from=done)


def _open_shard(emb_part: Path, psg_part: Path, rows: int, done: int, shape: tuple[int, int], dtype: str) -> Any:
    """The shard's vectors memory-mapped for writing (new, or resumed after `done` rows); None when empty."""
    if rows == 0:  # an empty shard (more shards than passages): nothing to map
        with open(emb_part, "wb") as handle:
            np.save(handle, np.zeros((0, shape[1]), dtype=dtype))
        psg_part.write_bytes(b"")
        return None
    if done == 0:
        psg_part.write_bytes(b"")
        return np.lib.format.open_memmap(emb_part, mode="w+", dtype=dtype, shape=shape)
    return np.lib.format.open_memmap(emb_part, mode="r+")


def _reserved(path: Path) -> bool:
    """Reserve the disk blocks of a memory-mapped shard before writing through the map: a sparse file on a
    full disk would otherwise end the process with SIGBUS at the first page that finds no space, with no
    message. False when the device has no room; where the filesystem cannot reserve, writes proceed as before."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return False
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)
    return True


@dataclass
class ShardSet:
    """A complete set of embedding shards, checked, not yet read: `blocks()` streams it."""

    root: Path
    encoder: EncoderInfo
    metas: list[dict[str, Any]]

    @property
    def rows(self) -> int:
        return sum(int(m["rows"]) for m in self.metas)

    def blocks(self, size: int = 10_000) -> Iterator[tuple[list[Passage], np.ndarray, list[int], str, tuple[Path, int]]]:
        """(passages, their vectors as a slice of the memory-mapped .npy, line numbers, passages file, (the .npy,
        first row)) in row order, `size` passages at a time: nothing but one block is held in memory."""
        for meta in self.metas:
            emb_path, psg_path = self.root / meta["embeddings"], self.root / meta["passages"]
            vectors = self._vectors(emb_path, meta)
            row = 0
            block: list[Passage] = []
            lines: list[int] = []
            for lineno, passage in iter_passages_with_lines(psg_path, allow_empty=True):
                block.append(passage)
                lines.append(lineno)
                if len(block) == size:
                    if row + size > vectors.shape[0]:
                        break
                    yield (block, finite_rows(vectors[row : row + size], emb_path, row), lines, str(psg_path),
                           (emb_path, row))
                    # the checked pages leave the process (the page cache keeps them): a 32 GB shard set
                    # otherwise counted whole in the build's resident memory by the time the last block came
                    drop_pages(vectors)
                    row += size
                    block, lines = [], []
            if row + len(block) != vectors.shape[0]:
                count = row + len(block)
                raise InputError(Location(str(psg_path)), f"{'more than ' if count > vectors.shape[0] else ''}{count} "
                                 f"passages for {vectors.shape[0]} vectors in {emb_path.name}")
            if block:
                yield (block, finite_rows(vectors[row : row + len(block)], emb_path, row), lines, str(psg_path),
                       (emb_path, row))

    def _vectors(self, path: Path, meta: dict[str, Any]) -> np.ndarray:
        """The shard's vectors, memory-mapped, after the checks a damaged or foreign file fails (exit 3, naming
        it): readable as .npy without pickles, float16/float32, (rows, dim) as its description says."""
        try:
            vectors = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise InputError(Location(str(path)), "the shard's vectors file is missing") from None
        except (ValueError, OSError, EOFError) as exc:  # not .npy, truncated, or object dtype (a pickle)
            raise InputError(Location(str(path)), f"not a readable .npy array of vectors ({exc})") from None
        if vectors.dtype not in (np.float16, np.float32):
            raise InputError(Location(str(path)), f"vectors stored as {vectors.dtype}; shards hold float16 or float32")
        if vectors.ndim != 2 or vectors.shape[1] != self.encoder.dim:
            raise InputError(Location(str(path)), f"vectors of shape {tuple(vectors.shape)}, the shards' "
                             f"embedder gives dimension {self.encoder.dim}")
        if vectors.shape[0] != meta.get("rows"):
            raise InputError(Location(str(path), None, "rows"), f"{vectors.shape[0]} vectors, its shard description "
                             f"says {meta.get('rows')}")
        return vectors




def _plain_name(root: Path, meta_path: Path, meta: dict[str, Any], key: str) -> str:
    """A shard names its files; only plain names inside the shard folder are accepted."""
    name = meta.get(key)
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise InputError(Location(str(meta_path), None, key), f"'{name}' is not a file name inside {root}")
    return name


def open_shards(directory: str | Path) -> ShardSet:
    """All shards of a directory, checked for completeness and for one common embedder."""
    root = Path(directory)
    if not root.is_dir():
        raise ResourceError(f"{root}: no such embeddings directory")
    metas: dict[int, dict[str, Any]] = {}
    totals = set()
    for path in sorted(root.iterdir()):
        match = _SHARD_RE.match(path.name)
        if match:
            try:
                meta = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InputError(Location(str(path)), f"unreadable shard description ({exc})") from None
            for key in ("embeddings", "passages"):
                meta[key] = _plain_name(root, path, meta, key)
            metas[int(match.group(1))] = meta
            totals.add(int(match.group(2)))
    if not metas:
        raise ResourceError(f"{root}: no embedding shards (shard-*-of-*.json)", hint="Write them with `ragkit embed`.")
    if len(totals) != 1:
        raise ResourceError(f"{root}: shards from different --num-shards runs ({sorted(totals)})")
    (num_shards,) = totals
    missing = sorted(set(range(num_shards)) - set(metas))
    if missing:
        raise ResourceError(f"{root}: shards {missing} of {num_shards} are missing", hint="Run `ragkit embed` for them.")
    for shard_id, meta in metas.items():  # a description copied from another run's shard set
        if meta.get("num_shards") != num_shards or meta.get("shard_id") != shard_id:
            raise InputError(Location(str(root / _names(shard_id, num_shards)[2]), None, "num_shards"),
                             f"describes shard {meta.get('shard_id')} of {meta.get('num_shards')}, but is named "
                             f"shard {shard_id} of {num_shards}")
    encoders = {json.dumps(m["encoder"], sort_keys=True) for m in metas.values()}
    if len(encoders) != 1:
        raise ResourceError(f"{root}: shards were embedded with different models or settings")
    return ShardSet(root, EncoderInfo.from_json(metas[0]["encoder"]), [metas[i] for i in range(num_shards)])

