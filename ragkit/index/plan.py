"""`ragkit index plan`: what each index spec costs for N passages of dimension d, before building it.

Every number is an estimate from the formulas of `ragkit.index.spec.estimate_memory`, of the streaming
build (`ragkit.index.builder`) and of the build-time model (`ragkit.index.build_time`): building holds the
Faiss index, one block of vectors in float32 and the IVF/PQ training sample; serving holds the Faiss index
(the passage store and exact vectors are read from disk, through the page cache); disk is the Faiss file,
the passage store, the exact vectors of a spec with refine=R and, while building from a corpus, the spill
of the vectors. Measured against builds in benchmarks/scale.py and benchmarks/wikipedia_scale.py
(docs/benchmarks.md). The table, the headline (auto's choice, always one of the rows) and the advice come
from the same rows, and `--json` carries the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ragkit.errors import UsageError
from ragkit.index.build_time import estimate_build_seconds, format_seconds
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
    ivf_lists,
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
    build_seconds: float
    in_time: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec, "factory": self.factory, "serve_bytes": self.serve_bytes,
                "build_bytes": self.build_bytes, "disk_bytes": self.disk_bytes, "fits": self.fits,
                "shards_needed": self.shards, "build_seconds": round(self.build_seconds, 1),
                "in_time": self.in_time}


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
            nlist = ivf_lists(text)
            return n * (dim + 8) + nlist * dim * 4
    return estimate_memory(spec, n, dim)


def build_bytes(spec: IndexSpec, n: int, dim: int) -> int:
    factory = spec.factory(dim, n)
    sample = 0
    if factory.startswith("IVF") or "PQ" in factory or "SQ" in factory:
        nlist = ivf_lists(factory) or 1
        sample = training_rows(n, dim, nlist) * dim * 4
    return serve_bytes(spec, n, dim) + min(n, ADD_BLOCK) * dim * 4 + sample + PROCESS_BYTES


def disk_bytes(spec: IndexSpec, n: int, dim: int, passage_bytes: int) -> int:
    faiss_file = serve_bytes(spec, n, dim) - (n * IDMAP_BYTES if spec.kind in ("flat", "hnsw") else 0) + 8 * n
    exact = n * dim * 2 if spec.refine else 0  # float16 vectors for re-ranking (hard links to the shards)
    return faiss_file + exact + n * (passage_bytes + STORE_OVERHEAD)


def plan(n: int, dim: int, *, max_memory: int | None = None, max_seconds: float | None = None,
         passage_bytes: int = 600) -> dict[str, Any]:
    """Each candidate's costs, which fit `max_memory` (default half the RAM) and `max_seconds` to build, and
    what `auto` takes (always one of the rows)."""
    if n <= 0 or dim <= 0:
        raise UsageError("index plan needs a positive number of passages and dimension")
    budget = max_memory if max_memory is not None else available_memory() // 2
    try:
        choice = choose_auto(n, dim, budget, max_seconds)
        auto: dict[str, Any] = {"spec": choice.spec.text, "factory": choice.spec.factory(dim, n), "reason": choice.reason}
        chosen: IndexSpec | None = choice.spec
    except UsageError as exc:
        auto, chosen = {"spec": None, "reason": exc.message}, None
    specs = candidates(n, dim)
    if chosen is not None and chosen.text not in {s.text for s in specs}:
        specs.append(chosen)
    rows = []
    for spec in specs:
        serve, build = serve_bytes(spec, n, dim), build_bytes(spec, n, dim)
        seconds = estimate_build_seconds(spec, n, dim)
        rows.append(PlanRow(spec.text, spec.factory(dim, n), serve, build, disk_bytes(spec, n, dim, passage_bytes),
                            build <= budget, max(1, math.ceil(serve / budget)), seconds,
                            max_seconds is None or seconds <= max_seconds))
    if chosen is not None:
        auto["build_seconds"] = round(next(r.build_seconds for r in rows if r.spec == chosen.text), 1)
    spill = n * dim * 4  # from a corpus: the encoder's float32 vectors
    return {"passages": n, "dim": dim, "max_memory": budget, "max_build_seconds": max_seconds,
            "passage_bytes": passage_bytes, "candidates": [r.to_json() for r in rows], "auto": auto,
            "build_spill_bytes": spill, "advice": _advice(rows, budget, spill, auto)}


def _advice(rows: list[PlanRow], budget: int, spill: int, auto: dict[str, Any]) -> list[str]:
    out = []
    fitting = [r for r in rows if r.fits and r.in_time]
    exact = rows[0]
    if exact.fits:
        out.append(f"exact search (flat) fits: {format_bytes(exact.build_bytes)} to build within {format_bytes(budget)}")
    else:
        out.append(f"exact search needs {format_bytes(exact.serve_bytes)}: {exact.shards} index shards of at most "
                   f"{format_bytes(budget)}, one Ray actor each (`train --distributed-retriever ray --shard-index "
                   f"--index s0,s1,...`), or a compressed spec on one machine")
    if auto.get("spec"):
        row = next(r for r in rows if r.spec == auto["spec"])
        out.append(f"auto takes {row.spec} ({row.factory}): {format_bytes(row.serve_bytes)} to serve, "
                   f"{format_bytes(row.build_bytes)} and ~{format_seconds(row.build_seconds)} to build")
    elif fitting:
        out.append(f"auto: {auto['reason']}")
    else:
        out.append("nothing fits one machine: shard across Ray actors or raise --max-memory")
    out.append(f"building from a corpus spills the vectors to disk first: {format_bytes(spill)} as float32 "
               f"(embedding shards in float16 are read in place)")
    return out


def render(result: dict[str, Any]) -> Any:
    from rich.table import Table

    budget = f"budget {format_bytes(result['max_memory'])}"
    if result.get("max_build_seconds"):
        budget += f" and {format_seconds(result['max_build_seconds'])}"
    title = (f"{result['passages']:,} passages x {result['dim']} dims, {budget} — "
             f"auto: {result['auto'].get('spec')}")
    table = Table(title=title, title_justify="left")
    for column in ("spec", "factory", "RAM to build", "RAM to serve", "disk", "time to build", "fits", "shards"):
        table.add_column(column, justify="left" if column in ("spec", "factory") else "right", overflow="fold")
    for row in result["candidates"]:
        fits = ("yes" if row["in_time"] else "over time") if row["fits"] else "no"
        table.add_row(row["spec"], row["factory"], format_bytes(row["build_bytes"]), format_bytes(row["serve_bytes"]),
                      format_bytes(row["disk_bytes"]), format_seconds(row["build_seconds"]), fits,
                      str(row["shards_needed"]))
    return table
