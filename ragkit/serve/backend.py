"""What the server searches: an index opened in this process and followed to each new version
(`LiveIndex`), or Ray actors holding replicas or shards of it (`RayCollection`). Both are driven from the
micro-batcher's one worker thread, so a batch searches one version and a version switch happens between
batches."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragkit.console import info as say
from ragkit.errors import RagkitError, ResourceError, UsageError
from ragkit.retrieval.retriever import RetrievalMode


@dataclass(frozen=True)
class Query:
    id: str
    text: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchJob:
    queries: list[Query]
    k: int
    mode: RetrievalMode


@dataclass(frozen=True)
class PassagesJob:
    ids: list[str]


@dataclass(frozen=True)
class InfoJob:
    pass


def result_row(query: Query, hits: Any) -> dict[str, Any]:
    """The row `ragkit index search` prints for one query."""
    return {"id": query.id, "query": query.text, **query.extra, "hits": [h.to_json() for h in hits]}


class _Backend:
    """The batch handler shared by both layouts: one encoding pass for every dense query of the batch,
    then one search per (mode, k) group."""

    version: int
    has_sparse: bool

    def encode(self, texts: list[str]) -> Any:
        raise NotImplementedError

    def search_group(self, texts: list[str], k: int, mode: RetrievalMode, vectors: Any) -> list[Any]:
        raise NotImplementedError

    def passages(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def refresh(self) -> bool:
        return False

    def handle(self, jobs: list[Any]) -> list[Any]:
        out: list[Any] = [None] * len(jobs)
        searches = []
        for i, job in enumerate(jobs):
            if isinstance(job, SearchJob):
                if job.mode.mode != "dense" and not self.has_sparse:
                    out[i] = UsageError(f"mode {job.mode.mode}: this index has no sparse (BM25) side")
                else:
                    searches.append(i)
            elif isinstance(job, PassagesJob):
                out[i] = {"version": self.version, "passages": self.passages(job.ids)}
            else:
                out[i] = {"version": self.version, **self.describe()}
        if searches:
            try:
                for i, rows in zip(searches, self._search_all([jobs[i] for i in searches])):
                    out[i] = {"version": self.version, "results": rows}
            except RagkitError as exc:
                for i in searches:
                    out[i] = exc
        return out

    def _search_all(self, jobs: list[SearchJob]) -> list[list[dict[str, Any]]]:
        dense_texts = [q.text for job in jobs if job.mode.mode != "sparse" for q in job.queries]
        vectors = self.encode(dense_texts) if dense_texts else None
        # where each job's queries sit in `vectors`, then the jobs grouped by how they search
        starts, at = [], 0
        for job in jobs:
            starts.append(at)
            at += len(job.queries) if job.mode.mode != "sparse" else 0
        groups: dict[tuple[RetrievalMode, int], list[int]] = defaultdict(list)
        for j, job in enumerate(jobs):
            groups[(job.mode, job.k)].append(j)
        rows: list[list[dict[str, Any]]] = [[] for _ in jobs]
        for (mode, k), members in groups.items():
            texts = [q.text for j in members for q in jobs[j].queries]
            group_vectors = None
            if vectors is not None and mode.mode != "sparse":
                import numpy as np

                group_vectors = np.concatenate([vectors[starts[j]:starts[j] + len(jobs[j].queries)] for j in members])
            hits = self.search_group(texts, k, mode, group_vectors)
            at = 0
            for j in members:
                n = len(jobs[j].queries)
                rows[j] = [result_row(q, h) for q, h in zip(jobs[j].queries, hits[at:at + n])]
                at += n
        return rows


class LiveIndex(_Backend):
    """One index in this process, followed to each version a writer publishes."""

    OPEN_TRIES = 5  # a writer may publish again (and delete the version just read) while we open it

    def __init__(self, root: str | Path, *, embedder: str | None = None, device: str = "auto", threads: int = 0,
                 backend: str = "torch") -> None:
        from ragkit.index import Index
        from ragkit.models.encoder import resolve_device
        from ragkit.retrieval.retriever import Retriever

        self.root = Path(root)
        index = Index.open(self.root, device=resolve_device(device), threads=threads or None).load()
        self.retriever = Retriever(index, model=embedder, device=resolve_device(device), backend=backend)
        self.reloads = 0
        self.last_reload_s: float | None = None
        self.reload_error: str | None = None

    @property
    def index(self) -> Any:
        return self.retriever.index

    @property
    def version(self) -> int:
        return int(self.index.manifest["version"])

    @property
    def has_sparse(self) -> bool:  # type: ignore[override]
        return bool(self.index.has_sparse)

    def refresh(self) -> bool:
        """Switch to the published version if it is newer than the one served (a readlink when not)."""
        from ragkit.index import layout

        try:
            if layout.current_version_dir(self.root) == self.index.version_dir:
                return False
            started = time.perf_counter()
            for attempt in range(self.OPEN_TRIES):
                try:
                    newer = self.index.latest().load()
                    break
                except (FileNotFoundError, ResourceError):
                    if attempt == self.OPEN_TRIES - 1:
                        raise
                    time.sleep(0.05 * (attempt + 1))
            self.retriever = self.retriever.with_index(newer)
        except (OSError, RagkitError) as exc:
            message = exc.message if isinstance(exc, RagkitError) else str(exc)
            if message != self.reload_error:
                say(f"serve: still serving version {self.version}; the new one did not open ({message})")
            self.reload_error = message
            return False
        self.reloads += 1
        self.reload_error = None
        self.last_reload_s = time.perf_counter() - started
        say(f"serve: now serving version {self.version} of {self.root} ({self.last_reload_s:.2f} s to switch)")
        return True

    def encode(self, texts: list[str]) -> Any:
        return self.retriever.encode(texts)

    def search_group(self, texts: list[str], k: int, mode: RetrievalMode, vectors: Any) -> list[Any]:
        return self.retriever.search(texts, k, mode=mode, vectors=vectors)

    def passages(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        from ragkit.index.hits import passage_json

        return {pid: passage_json(p) for pid, p in self.index.get(ids).items()}

    def describe(self) -> dict[str, Any]:
        return {"layout": "in-process", "index": self.index.info(), "reloads": self.reloads,
                "last_reload_s": self.last_reload_s, "reload_error": self.reload_error}


class RayCollection(_Backend):
    """Replicas or shards on ragkit.retrieval's Ray actors; queries are encoded here and vectors sent.
    Each actor follows its own index to new versions before it searches. Dense search only: the BM25
    side stays with an in-process server."""

    has_sparse = False

    def __init__(self, roots: list[str], *, shards: bool, replicas: int, address: str | None,
                 embedder: str | None = None, device: str = "auto", threads: int = 0, backend: str = "torch") -> None:
        from ragkit.index import Index
        from ragkit.models.encoder import Encoder
        from ragkit.retrieval.ray_retriever import RayIndexClient

        self.roots = roots
        self.client = RayIndexClient(roots, mode="shards" if shards else "replicas", num_workers=max(1, replicas),
                                     address=address, threads=threads or None, follow_versions=True)
        self.encoder = Encoder.for_index(Index.open(roots[0]), model=embedder, device=device, backend=backend,
                                         queries=True)
        self.layout = f"{len(roots)} shards" if shards else f"{max(1, replicas)} replicas"
        self.version = int(self.client.versions()[0])

    def refresh(self) -> bool:
        """The version the first actor serves (each shard has its own numbering; every actor moves to its
        folder's new version by itself before it searches), asked before each batch and while idle, so
        that /health never waits on Ray."""
        self.version = int(self.client.versions()[0])
        return False

    def encode(self, texts: list[str]) -> Any:
        return self.encoder.encode_queries(texts)

    def search_group(self, texts: list[str], k: int, mode: RetrievalMode, vectors: Any) -> list[Any]:
        hits, _ = self.client.search(vectors, k)
        return hits

    def passages(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        return self.client.passages(ids)

    def describe(self) -> dict[str, Any]:
        return {"layout": f"ray: {self.layout}", "shards": self.client.infos()}

    def close(self) -> None:
        self.client.shutdown()
