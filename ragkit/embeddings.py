"""Embedding shards: what `ragkit embed` writes and `ragkit index build --embeddings` reads.

    DIR/embeddings-00000-of-00004.npy     float16/float32 (rows, dim), row i embeds passage i
    DIR/passages-00000-of-00004.jsonl     the shard's passages (id, title, text, other fields)
    DIR/shard-00000-of-00004.json         written last: model, fingerprint, dim, dtype, rows, range

Sharding follows the Self-RAG passage-embedding script: shard i of n takes rows
[i·⌊N/n⌋, (i+1)·⌊N/n⌋), and the last shard also takes the remainder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ragkit.errors import InputError, Location, ResourceError, UsageError
from ragkit.io.atomic import atomic_open, write_json
from ragkit.io.corpus import Passage
from ragkit.io.jsonl import read_jsonl
from ragkit.models.encoder import Encoder, EncoderInfo

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


def embed_shard(
    encoder: Encoder,
    passages: Sequence[Passage],
    out_dir: str | Path,
    *,
    shard_id: int = 0,
    num_shards: int = 1,
    dtype: str = "float16",
    batch_size: int = 64,
    on_block: Callable[[int], None] | None = None,
) -> ShardResult:
    import time

    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start, end = shard_bounds(len(passages), shard_id, num_shards)
    mine = passages[start:end]
    began = time.perf_counter()
    vectors = encoder.encode([p.embedding_text() for p in mine], batch_size=batch_size, on_block=on_block)
    seconds = time.perf_counter() - began
    emb_name, psg_name, meta_name = _names(shard_id, num_shards)
    with atomic_open(out / emb_name, "wb") as handle:
        np.save(handle, vectors.astype(dtype))
    with atomic_open(out / psg_name) as handle:
        for p in mine:
            handle.write(json.dumps(p.to_json(), ensure_ascii=False) + "\n")
    write_json(
        out / meta_name,
        {
            "encoder": encoder.info.to_json(),
            "dtype": dtype,
            "rows": len(mine),
            "corpus_rows": len(passages),
            "range": [start, end],
            "shard_id": shard_id,
            "num_shards": num_shards,
            "embeddings": emb_name,
            "passages": psg_name,
        },
    )
    return ShardResult(len(mine), start, end, seconds, [out / emb_name, out / psg_name, out / meta_name])


def load_shards(directory: str | Path) -> tuple[list[Passage], np.ndarray, EncoderInfo]:
    """All shards of a directory, checked for completeness and for one common embedder."""
    root = Path(directory)
    if not root.is_dir():
        raise ResourceError(f"{root}: no such embeddings directory")
    metas: dict[int, dict[str, Any]] = {}
    totals = set()
    for path in sorted(root.iterdir()):
        match = _SHARD_RE.match(path.name)
        if match:
            meta = json.loads(path.read_text(encoding="utf-8"))
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
    encoders = {json.dumps(m["encoder"], sort_keys=True) for m in metas.values()}
    if len(encoders) != 1:
        raise ResourceError(f"{root}: shards were embedded with different models or settings")
    encoder = EncoderInfo.from_json(metas[0]["encoder"])
    passages: list[Passage] = []
    blocks = []
    for shard_id in range(num_shards):
        meta = metas[shard_id]
        vectors = np.load(root / meta["embeddings"], mmap_mode="r", allow_pickle=False)
        psg_path = root / meta["passages"]
        rows = [Passage(str(obj.pop("id")), obj.pop("text"), obj.pop("title", ""), obj) for _, obj in read_jsonl(psg_path)]
        if len(rows) != vectors.shape[0] or vectors.shape[1] != encoder.dim:
            raise InputError(
                Location(str(psg_path)),
                f"{len(rows)} passages for {vectors.shape[0]} vectors of dimension {vectors.shape[1]}",
            )
        passages.extend(rows)
        blocks.append(vectors)
    return passages, np.concatenate(blocks).astype(np.float32, copy=False), encoder
