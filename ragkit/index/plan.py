"""`ragkit index plan`: what each index spec costs for N passages of dimension d, before building it.

Every number is an estimate from the formulas of `ragkit.index.spec.estimate_memory` and of the streaming
build (`ragkit.index.builder`): building holds the Faiss index, one block of vectors in float32 and the
IVF/PQ training sample; serving holds the Faiss index (the passage store is read from disk, through the
page cache); disk is the Faiss file, the passage store and, while building from a corpus, the spill of
the vectors. Measured against builds in benchmarks/scale.py (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ragkit.errors import UsageError
from ragkit.index.builder import ADD_BLOCK
from ragkit.index.spec import (
    IDMAP_BYTES,
    IndexSpec,
    available_memory,
    choose_auto,
    default_nlist,
    default_pq_m,
    estimate_memory,
    format_bytes,
)
from ragkit.index.vectors import training_rows

PROCESS_BYTES = 512 * 2**20  # Python, Faiss, NumPy and SQLite's own cache while building
STORE_OVERHEAD = 64  # SQLite bytes per passage beyond its text: row header, vid, the id index


@dataclass
class PlanRow:
    spec: str
    factory: str
    serve_bytes: int
    build_bytes: int
    disk_bytes: int
    fits: bool
    shards: int

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec, "factory": self.factory, "serve_bytes": self.serve_bytes,
                "build_bytes": self.build_bytes, "disk_bytes": self.disk_bytes, "fits": self.fits,
                "shards_needed": self.shards}


def candidates(n: int, dim: int) -> list[IndexSpec]:
    nlist = default_nlist(n)
    out = [IndexSpec("flat"), IndexSpec("hnsw", {"M": 32}), IndexSpec("factory", {}, f"IVF{nlist},SQ8")]
    for m in sorted({default_pq_m(dim), _divisor_at_most(dim, dim // 8), _divisor_at_most(dim, dim // 16)}, reverse=True):
        if m >= 1:
            out.append(IndexSpec("ivf-pq", {"nlist": nlist, "m": m}))
    return out


def _divisor_at_most(dim: int, target: int) -> int:
    for m in range(max(1, target), 0, -1):
        if dim % m == 0:
            return m
    return 1


def serve_bytes(spec: IndexSpec, n: int, dim: int) -> int:
    if spec.kind == "factory":
        text = str(spec.factory_string)
        if text.startswith("IVF") and text.endswith(",SQ8"):
            nlist = int(text[3:].split(",")[0])
            return n * (dim + 8) + nlist * dim * 4
    return estimate_memory(spec, n, dim)


def build_bytes(spec: IndexSpec, n: int, dim: int) -> int:
    factory = spec.factory(dim, n)
    sample = 0
    if factory.startswith("IVF") or "PQ" in factory or "SQ" in factory:
        nlist = int(factory[3:].split(",")[0]) if factory.startswith("IVF") else 1
        sample = training_rows(n, dim, nlist) * dim * 4
    return serve_bytes(spec, n, dim) + min(n, ADD_BLOCK) * dim * 4 + sample + PROCESS_BYTES


def disk_bytes(spec: IndexSpec, n: int, dim: int, passage_bytes: int) -> int:
    faiss_file = serve_bytes(spec, n, dim) - (n * IDMAP_BYTES if spec.kind in ("flat", "hnsw") else 0) + 8 * n
    return faiss_file + n * (passage_bytes + STORE_OVERHEAD)


def plan(n: int, dim: int, *, max_memory: int | None = None, passage_bytes: int = 600) -> dict[str, Any]:
    """Each candidate's costs, which fit `max_memory` (default half the RAM), and what `auto` takes."""
    if n <= 0 or dim <= 0:
        raise UsageError("index plan needs a positive number of passages and dimension")
    budget = max_memory if max_memory is not None else available_memory() // 2
    rows = []
    for spec in candidates(n, dim):
        serve, build = serve_bytes(spec, n, dim), build_bytes(spec, n, dim)
        rows.append(PlanRow(spec.text, spec.factory(dim, n), serve, build, disk_bytes(spec, n, dim, passage_bytes),
                            build <= budget, max(1, math.ceil(serve / budget))))
    try:
        choice = choose_auto(n, dim, budget)
        auto: dict[str, Any] = {"spec": choice.spec.text, "factory": choice.spec.factory(dim, n), "reason": choice.reason}
    except UsageError as exc:
        auto = {"spec": None, "reason": exc.message}
    spill = n * dim * 2
    return {"passages": n, "dim": dim, "max_memory": budget, "passage_bytes": passage_bytes,
            "candidates": [r.to_json() for r in rows], "auto": auto,
            "build_spill_bytes": spill,
            "advice": _advice(rows, budget, n, dim)}


def _advice(rows: list[PlanRow], budget: int, n: int, dim: int) -> list[str]:
    out = []
    fitting = [r for r in rows if r.fits]
    exact = rows[0]
    if exact.fits:
        out.append(f"exact search (flat) fits: {format_bytes(exact.build_bytes)} to build within {format_bytes(budget)}")
    else:
        out.append(f"exact search needs {format_bytes(exact.serve_bytes)}: {exact.shards} index shards of at most "
                   f"{format_bytes(budget)}, one Ray actor each (`train --distributed-retriever ray --shard-index "
                   f"--index s0,s1,...`), or a compressed spec on one machine")
    if fitting:
        best = max(fitting, key=lambda r: r.serve_bytes)
        out.append(f"the most accurate spec that fits one machine: {best.spec} ({best.factory}, "
                   f"{format_bytes(best.serve_bytes)} to serve)")
    else:
        out.append("nothing fits one machine: shard across Ray actors or raise --max-memory")
    out.append(f"building from a corpus spills the vectors to disk first: {format_bytes(n * dim * 4)} as float32 "
               f"(embedding shards in float16 are read in place)")
    return out


def render(result: dict[str, Any]) -> Any:
    from rich.table import Table

    title = (f"{result['passages']:,} passages x {result['dim']} dims, budget {format_bytes(result['max_memory'])} — "
             f"auto: {result['auto'].get('spec')}")
    table = Table(title=title, title_justify="left")
    for column in ("spec", "factory", "RAM to build", "RAM to serve", "disk", "fits", "shards"):
        table.add_column(column, justify="left" if column in ("spec", "factory") else "right", overflow="fold")
    for row in result["candidates"]:
        table.add_row(row["spec"], row["factory"], format_bytes(row["build_bytes"]), format_bytes(row["serve_bytes"]),
                      format_bytes(row["disk_bytes"]), "yes" if row["fits"] else "no", str(row["shards_needed"]))
    return table
