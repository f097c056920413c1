"""Retrieval served by Ray actors: replicas of one index, or one shard each with the top-k merged.

The caller embeds its queries (the query encoder may be training) and sends vectors; each actor
loads its index once and answers `search` calls. Replicas are used round-robin so that concurrent
training workers do not queue behind one actor; shards are all asked and their hits merged by score,
for indexes larger than one process's memory.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ragkit.errors import ResourceError, UsageError
from ragkit.index import Hit, Index


class _Worker:
    """The actor body: one opened index; with `follow`, moved to each version a writer publishes before
    it answers (a server's hot reload; training keeps the version it started with)."""

    def __init__(self, index_dir: str, threads: int | None, follow: bool = False) -> None:
        self.index = Index.open(index_dir, threads=threads)
        self.follow = follow

    def _followed(self) -> Index:
        if self.follow:
            from ragkit.index import layout

            if layout.current_version_dir(self.index.root) != self.index.version_dir:
                self.index = self.index.latest().load()
        return self.index

    def info(self) -> dict[str, Any]:
        index = self._followed()
        return {"dim": index.dim, "encoder": index.encoder.to_json(), "passages": len(index),
                "version": int(index.manifest["version"]), "path": str(index.root)}

    def version(self) -> int:
        return int(self._followed().manifest["version"])

    def get(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        from ragkit.index.hits import passage_json

        return {pid: passage_json(p) for pid, p in self._followed().get(ids).items()}

    def search(self, vectors: np.ndarray, k: int, with_vectors: bool) -> tuple[list[list[dict[str, Any]]], Any]:
        index = self._followed()
        if with_vectors:
            hits, vecs = index.search_with_vectors(vectors, k)
        else:
            hits, vecs = index.search(vectors, k), None
        return [[h.to_json() for h in row] for row in hits], vecs


def uses_private_ray(address: str | None) -> bool:
    """Whether `start_ray(address)` would start a private local Ray (no address given, none in $RAY_ADDRESS)."""
    import os

    return not (address or os.environ.get("RAY_ADDRESS"))


RAY_CONNECT_TIMEOUT_S = 5.0


def check_reachable(address: str, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Refuse at once a Ray address where nothing answers: `ray.init` retries such an address for minutes
    (6.5 min measured, one core busy) before it gives up with a ConnectionError. `auto` is Ray's own lookup."""
    import socket

    from ragkit.retrieval.loopback import split_address

    host, port = split_address(address)
    if host == "auto" or not port:
        return
    try:
        number = int(port)
    except ValueError:
        raise UsageError(f"ray_address {address}: expected HOST:PORT (or ray://HOST:PORT, or auto)") from None
    try:
        with socket.create_connection((host, number), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise ResourceError(f"Ray cluster at {address}: {reason.lower()}",
                            hint="Start it (`ray start --head`), check the address, or leave the address out "
                                 "for a private local Ray.") from None


def start_ray(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Connect to `address` (or $RAY_ADDRESS), else start a private local Ray on 127.0.0.1 (`loopback`)."""
    import os

    try:
        import ray
    except ImportError:
        raise ResourceError("--distributed-retriever ray needs Ray", hint="pip install 'ragkit[ray]'") from None
    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if address:
            from ragkit.retrieval.loopback import prepare_connect

            check_reachable(address)
            prepare_connect(address)
            ray.init(address=address, namespace="ragkit", ignore_reinit_error=True)
        else:
            from ragkit.retrieval.loopback import init_private_ray

            init_private_ray(ray, num_cpus)
    return ray


class RayIndexClient:
    """Search vectors through Ray actors; same results as `Index.search` on the same data.

    With `name`, the actors are named `NAME-0`, `NAME-1`, ... in the "ragkit" namespace and reused when they
    exist, so that the processes of one job (torchrun / accelerate ranks connected to one cluster) share them
    instead of each starting its own."""

    def __init__(self, index_dirs: Sequence[str | Path], *, mode: str = "replicas", num_workers: int = 1,
                 address: str | None = None, threads: int | None = None, cpus_per_worker: float = 1.0,
                 name: str | None = None, follow_versions: bool = False) -> None:
        if mode not in ("replicas", "shards"):
            raise UsageError(f"ray retriever mode {mode}: expected replicas or shards")
        ray = start_ray(address)
        actor = ray.remote(num_cpus=cpus_per_worker)(_Worker)
        dirs = [str(d) for d in index_dirs]
        if mode == "replicas":
            if len(dirs) != 1:
                raise UsageError("replicas serve one index; give shards=... for several")
            dirs = dirs * max(1, num_workers)

        def start(i: int, directory: str) -> Any:
            options = {} if name is None else {"name": f"{name}-{i}", "get_if_exists": True}
            return actor.options(**options).remote(directory, threads, follow_versions)

        self.workers = [start(i, d) for i, d in enumerate(dirs)]
        infos = ray.get([w.info.remote() for w in self.workers])
        dims = {i["dim"] for i in infos}
        fingerprints = {i["encoder"]["fingerprint"] for i in infos}
        if len(dims) != 1 or len(fingerprints) != 1:
            raise ResourceError("the index shards were built with different embedders or dimensions")
        self.encoder_info = infos[0]["encoder"]
        self.dim = dims.pop()
        self.mode = mode
        self._next = itertools.cycle(range(len(self.workers)))
        self._ray = ray

    def search(self, vectors: np.ndarray, k: int, *, with_vectors: bool = False) -> tuple[list[list[Hit]], Any]:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.mode == "replicas":
            rows, vecs = self._ray.get(self.workers[next(self._next)].search.remote(vectors, k, with_vectors))
            return [[Hit(**h) for h in row] for row in rows], vecs
        parts = self._ray.get([w.search.remote(vectors, k, with_vectors) for w in self.workers])
        return merge_shards([p[0] for p in parts], [p[1] for p in parts] if with_vectors else None, k)

    def infos(self) -> list[dict[str, Any]]:
        return self._ray.get([w.info.remote() for w in self.workers])

    def versions(self) -> list[int]:
        return self._ray.get([w.version.remote() for w in self.workers])

    def passages(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """The passages of `ids` (a replica holds them all; each shard is asked for its own)."""
        workers = self.workers if self.mode == "shards" else [self.workers[next(self._next)]]
        found: dict[str, dict[str, Any]] = {}
        for part in self._ray.get([w.get.remote(list(ids)) for w in workers]):
            found.update(part)
        return found

    def search_with_vectors(self, vectors: np.ndarray, k: int) -> tuple[list[list[Hit]], np.ndarray]:
        """The `Index.search_with_vectors` contract, so RAG training can use either."""
        hits, vecs = self.search(vectors, k, with_vectors=True)
        if any(len(row) < k for row in hits):
            raise ResourceError(f"the index holds fewer than the {k} passages needed per query")
        return hits, vecs

    @staticmethod
    def job_name(index_dirs: Sequence[str | Path], mode: str, num_workers: int) -> str:
        """One name per (index, layout): the ranks of a training job compute the same one."""
        import hashlib

        key = "|".join([*(str(Path(d).resolve()) for d in index_dirs), mode, str(num_workers)])
        return "ragkit-index-" + hashlib.sha256(key.encode()).hexdigest()[:12]

    def shutdown(self) -> None:
        for w in self.workers:
            self._ray.kill(w)


def merge_shards(per_shard: list[list[list[dict[str, Any]]]], vectors: list[np.ndarray] | None,
                 k: int) -> tuple[list[list[Hit]], Any]:
    """Top-k over every shard's top-k (higher score first), ranks renumbered."""
    merged, merged_vecs = [], []
    for q in range(len(per_shard[0])):
        pool = [(h["score"], s, j, h) for s, shard in enumerate(per_shard) for j, h in enumerate(shard[q])]
        pool.sort(key=lambda t: -t[0])
        best = pool[:k]
        merged.append([Hit(**{**h, "rank": r}) for r, (_, _, _, h) in enumerate(best, start=1)])
        if vectors is not None:
            merged_vecs.append(np.stack([vectors[s][q, j] for _, s, j, _ in best]))
    return merged, (np.stack(merged_vecs) if vectors is not None else None)
