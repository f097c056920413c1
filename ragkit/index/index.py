"""`Index`: the one index abstraction (Faiss vectors + SQLite passages + manifest in one directory)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ragkit import __version__
from ragkit.errors import InputError, Location, ResourceError, UsageError
from ragkit.index import layout
from ragkit.index import vectors as fv
from ragkit.index.sparse import SparseConfig, SparseSide, build_sparse, sparse_files
from ragkit.index.spec import IndexSpec, parse_spec, resolve_spec
from ragkit.index.store import PassageStore
from ragkit.io.corpus import Passage
from ragkit.models.encoder import EncoderInfo

FORMAT = "ragkit-index"
FORMAT_VERSION = 1
COMPACT_TOMBSTONE_FRACTION = 0.2  # rebuild an HNSW graph once a fifth of it is dead


@dataclass
class Hit:
    id: str
    score: float
    rank: int
    title: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {"id": self.id, "score": self.score, "rank": self.rank, "title": self.title, "text": self.text}
        if self.metadata:
            out["metadata"] = self.metadata
        return out


@dataclass
class ChangeReport:
    added: int = 0
    replaced: int = 0
    removed: int = 0
    missing: list[str] = field(default_factory=list)
    compacted: bool = False


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_unique(passages: Sequence[Passage]) -> None:
    seen: set[str] = set()
    for i, p in enumerate(passages, start=1):
        if p.id in seen:
            raise InputError(Location("<passages>", i, "id"), f"duplicate id '{p.id}'")
        seen.add(p.id)


def _check_vectors(passages: Sequence[Passage], vectors: np.ndarray, dim: int) -> None:
    if vectors.ndim != 2 or vectors.shape[0] != len(passages):
        raise UsageError(f"expected {len(passages)} vectors, got an array of shape {tuple(vectors.shape)}")
    if vectors.shape[1] != dim:
        raise ResourceError(f"vectors have dimension {vectors.shape[1]}, the index holds dimension {dim}")


class Index:
    """Open with `Index.open(dir)`, create with `Index.build(...)`; every change is a new atomic version."""

    def __init__(self, root: Path, version_dir: Path, manifest: dict[str, Any], faiss_index: Any, store: PassageStore):
        self.root = root
        self.version_dir = version_dir
        self.manifest = manifest
        self.faiss_index = faiss_index
        self.store = store
        self.tombstones = store.tombstones()
        self.device = "cpu"
        self._sparse: SparseSide | None = None
        fv.set_search_params(self.faiss_index, self.spec.search_params())

    # -- properties ------------------------------------------------------------------------------
    @property
    def spec(self) -> IndexSpec:
        return parse_spec(self.manifest["spec"])

    @property
    def encoder(self) -> EncoderInfo:
        return EncoderInfo.from_json(self.manifest["encoder"])

    @property
    def dim(self) -> int:
        return int(self.manifest["encoder"]["dim"])

    @property
    def metric(self) -> str:
        return str(self.manifest["metric"])

    def __len__(self) -> int:
        return int(self.manifest["counts"]["passages"])

    @property
    def sparse_config(self) -> SparseConfig | None:
        meta = self.manifest.get("sparse")
        return SparseConfig.from_json(meta) if meta else None

    @property
    def has_sparse(self) -> bool:
        return self.sparse_config is not None

    # -- opening ---------------------------------------------------------------------------------
    @staticmethod
    def exists(root: str | Path) -> bool:
        return Path(root).is_dir() and layout.current_version_dir(Path(root)) is not None

    @classmethod
    def open(cls, root: str | Path, *, device: str = "cpu", threads: int | None = None) -> "Index":
        import faiss

        root = Path(root)
        version_dir = layout.current_version_dir(root) if root.is_dir() else None
        if version_dir is None:
            raise ResourceError(
                f"{root}: not a ragkit index (no {layout.CURRENT}/{layout.MANIFEST})",
                hint="Build one with `ragkit index build CORPUS -o DIR`.",
            )
        manifest_path = version_dir / layout.MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ResourceError(f"{manifest_path}: unreadable manifest ({exc.msg})") from None
        if manifest.get("format") != FORMAT or int(manifest.get("format_version", 0)) > FORMAT_VERSION:
            raise ResourceError(f"{manifest_path}: unsupported index format {manifest.get('format_version')}")
        for name, meta in manifest["files"].items():
            path = version_dir / name
            if not path.exists() or path.stat().st_size != meta["bytes"]:
                raise ResourceError(f"{path}: missing or truncated (expected {meta['bytes']} bytes)")
        fv.set_threads(threads)
        faiss_index = faiss.read_index(str(version_dir / layout.VECTORS))
        store = PassageStore(version_dir / layout.PASSAGES, readonly=True)
        index = cls(root, version_dir, manifest, faiss_index, store)
        if device != "cpu":
            index.faiss_index, index.device = fv.to_device(faiss_index, device)
        return index

    def verify(self) -> list[str]:
        """Compare every file's sha256 with the manifest; returns the names that differ."""
        return [
            name
            for name, meta in self.manifest["files"].items()
            if sha256_file(self.version_dir / name) != meta["sha256"]
        ]

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        root: str | Path,
        passages: Sequence[Passage],
        vectors: np.ndarray,
        encoder: EncoderInfo,
        *,
        spec: str | IndexSpec = "flat",
        metric: str = "ip",
        max_memory: int | None = None,
        overwrite: bool = False,
        threads: int | None = None,
        device: str = "cpu",
        sparse: SparseConfig | None = None,
    ) -> "Index":
        """Create an index from passages and their vectors (row i embeds passages[i]); with `sparse`, also a
        BM25 side over the same passages."""
        root = Path(root)
        if metric not in fv.METRICS:
            raise UsageError(f"--metric {metric}: expected one of {', '.join(fv.METRICS)}")
        if not passages:
            raise InputError(Location("<passages>"), "empty corpus: no passages to index")
        if root.exists() and not root.is_dir():
            raise UsageError(f"{root}: exists and is not a directory")
        if root.is_dir() and any(root.iterdir()) and not cls.exists(root):
            raise UsageError(f"{root}: exists, is not empty and is not a ragkit index; refusing to write into it")
        if cls.exists(root) and not overwrite:
            raise UsageError(f"{root}: an index is already there", hint="Use --overwrite, or `ragkit index add`.")
        _check_unique(passages)
        _check_vectors(passages, vectors, encoder.dim)
        parsed = parse_spec(spec) if isinstance(spec, str) else spec
        resolved, reason = resolve_spec(parsed, len(passages), encoder.dim, max_memory)
        fv.set_threads(threads)

        with layout.writer_lock(root):
            version = layout.next_version(root)
            staging = layout.new_staging_dir(root, version)
            store = PassageStore(staging / layout.PASSAGES)
            vids = np.asarray(store.insert(passages), dtype=np.int64)
            store.commit()
            faiss_index = fv.new_index(resolved, encoder.dim, len(passages), metric)
            train_index, where = fv.to_device(faiss_index, device) if device != "cpu" else (faiss_index, "cpu")
            fv.train_if_needed(train_index, vectors)
            fv.add(train_index, vectors, vids)
            faiss_index = fv.to_cpu(train_index) if where != "cpu" else train_index
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "ragkit_version": __version__,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "encoder": encoder.to_json(),
                "metric": metric,
                "spec": resolved.text,
                "spec_requested": parsed.text,
                "auto_reason": reason,
                "factory": resolved.factory(encoder.dim, len(passages)),
                "removes_in_place": resolved.removes_in_place,
            }
            if sparse is not None:
                manifest["sparse"] = {"library": "bm25s", **sparse.to_json()}
                _rebuild_sparse(staging, store, sparse)
            store.close()
            cls._write_version(root, staging, version, manifest, faiss_index)
        return cls.open(root, device=device)

    @staticmethod
    def _write_version(root: Path, staging: Path, version: int, manifest: dict[str, Any], faiss_index: Any) -> Path:
        import faiss

        faiss.write_index(fv.to_cpu(faiss_index), str(staging / layout.VECTORS))
        store = PassageStore(staging / layout.PASSAGES, readonly=True)
        n_passages = len(store)
        n_tombstones = len(store.tombstones())
        store.close()
        manifest = dict(manifest)
        manifest["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        manifest["version"] = version
        manifest["counts"] = {"passages": n_passages, "vectors": int(faiss_index.ntotal), "tombstones": n_tombstones}
        manifest["files"] = {
            name: {"bytes": (staging / name).stat().st_size, "sha256": sha256_file(staging / name)}
            for name in (layout.VECTORS, layout.PASSAGES, *sparse_files(staging))
        }
        (staging / layout.MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        return layout.publish(root, staging, version)

    # -- changing --------------------------------------------------------------------------------
    def _mutate(self, change: Any, *, manifest: dict[str, Any] | None = None) -> ChangeReport:
        """Apply `change(store, faiss_index, report)` to a staged copy and publish it as a new version with
        `manifest` (default: the current one). `change` may return a Faiss index that replaces the old one."""
        manifest = self.manifest if manifest is None else manifest
        sparse = SparseConfig.from_json(manifest["sparse"]) if manifest.get("sparse") else None
        with layout.writer_lock(self.root):
            if layout.current_version_dir(self.root) != self.version_dir:
                raise ResourceError(f"{self.root}: changed by another writer since it was opened; open it again")
            version = layout.next_version(self.root)
            staging = layout.new_staging_dir(self.root, version)
            self.store.copy_to(staging / layout.PASSAGES)
            store = PassageStore(staging / layout.PASSAGES)
            cpu_index = fv.to_cpu(self.faiss_index)
            report = ChangeReport()
            try:
                replacement = change(store, cpu_index, report)
                if replacement is not None:
                    cpu_index = replacement
                if self._needs_compaction(store, cpu_index):
                    cpu_index = self._compact(store, cpu_index)
                    report.compacted = True
                store.commit()
                if sparse is not None:  # bm25s cannot update in place: rebuilt from the store
                    _rebuild_sparse(staging, store, sparse)
                store.close()
                self._write_version(self.root, staging, version, manifest, cpu_index)
            except BaseException:
                store.close()
                # The in-memory Faiss index may be half-changed: reload the last published version.
                reopened = Index.open(self.root)
                self.__dict__.update(reopened.__dict__)
                raise
        reopened = Index.open(self.root, device=self.device)
        self.__dict__.update(reopened.__dict__)
        return report

    def upsert(self, passages: Sequence[Passage], vectors: np.ndarray, encoder: EncoderInfo, *,
               adopt_encoder: dict[str, Any] | None = None) -> ChangeReport:
        """Add passages; a passage whose id exists replaces the old one (text and vector).

        adopt_encoder: the vectors come from a new state of the embedder (end-to-end RAG training refreshes
        the index while its document encoder trains): the manifest records that encoder, and this note
        under `end2end`, instead of refusing it."""
        manifest = None
        if adopt_encoder is not None:
            if encoder.dim != self.dim:
                raise ResourceError(f"vectors have dimension {encoder.dim}, the index holds dimension {self.dim}")
            manifest = {**self.manifest, "encoder": encoder.to_json(), "end2end": adopt_encoder}
        else:
            self.check_encoder(encoder)
        _check_unique(passages)
        _check_vectors(passages, vectors, self.dim)
        in_place = bool(self.manifest["removes_in_place"])

        def change(store: PassageStore, faiss_index: Any, report: ChangeReport) -> None:
            existing = store.vids_for([p.id for p in passages])
            if existing:
                old = np.fromiter(existing.values(), dtype=np.int64)
                if in_place:
                    fv.remove(faiss_index, old)
                store.delete(old.tolist(), tombstone=not in_place)
            new_vids = np.asarray(store.insert(passages), dtype=np.int64)
            fv.add(faiss_index, vectors, new_vids)
            report.replaced = len(existing)
            report.added = len(passages) - len(existing)

        return self._mutate(change, manifest=manifest)

    def remove(self, ids: Sequence[str]) -> ChangeReport:
        in_place = bool(self.manifest["removes_in_place"])

        def change(store: PassageStore, faiss_index: Any, report: ChangeReport) -> None:
            found = store.vids_for(list(dict.fromkeys(ids)))
            report.missing = [i for i in dict.fromkeys(ids) if i not in found]
            if found:
                vids = np.fromiter(found.values(), dtype=np.int64)
                if in_place:
                    fv.remove(faiss_index, vids)
                store.delete(vids.tolist(), tombstone=not in_place)
            report.removed = len(found)

        return self._mutate(change)

    def _needs_compaction(self, store: PassageStore, faiss_index: Any) -> bool:
        dead = len(store.tombstones())
        return dead > 0 and dead >= COMPACT_TOMBSTONE_FRACTION * max(1, faiss_index.ntotal)

    def _compact(self, store: PassageStore, faiss_index: Any) -> Any:
        """Rebuild an index that cannot remove (HNSW) from its live vectors, dropping tombstones."""
        live = np.asarray(store.all_vids(), dtype=np.int64)
        fresh = fv.new_index(self.spec, self.dim, len(live), self.metric)
        if len(live):
            vecs = fv.reconstruct(faiss_index, live)
            fv.train_if_needed(fresh, vecs)
            fv.add(fresh, vecs, live)
        store.clear_tombstones()
        return fresh

    # -- searching -------------------------------------------------------------------------------
    def check_encoder(self, encoder: EncoderInfo) -> None:
        """Refuse vectors from a model other than the one that embedded this index."""
        built = self.encoder
        if encoder.dim != built.dim:
            raise ResourceError(
                f"embedder '{encoder.name}' gives dimension {encoder.dim}; {self.root} was built with "
                f"'{built.name}' (dimension {built.dim})",
                hint=f"Search with --model {built.name}.",
            )
        if encoder.fingerprint != built.fingerprint or encoder.normalize != built.normalize:
            raise ResourceError(
                f"embedder '{encoder.name}' is not the model that built {self.root} ('{built.name}', "
                f"fingerprint {built.fingerprint[:12]}, normalize={built.normalize})",
                hint=f"Search with --model {built.name}, or rebuild the index with the new model.",
            )

    def set_search_params(self, *, ef_search: int | None = None, nprobe: int | None = None) -> None:
        params = {}
        if ef_search:
            params["efSearch"] = ef_search
        if nprobe:
            params["nprobe"] = nprobe
        fv.set_search_params(self.faiss_index, params)

    def _search_vids(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, set[int]]:
        """Faiss scores and vids, with room for tombstoned hits (callers drop them and keep k), and the set
        of those vids that may still be live (what the callers look up in the passage store)."""
        if k <= 0:
            raise UsageError("--k must be positive")
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise ResourceError(f"query vectors have dimension {queries.shape[1]}, the index holds {self.dim}")
        if self.faiss_index.ntotal == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64), set()
        fetch = min(self.faiss_index.ntotal, k + len(self.tombstones))
        scores, vids = fv.search(self.faiss_index, queries, fetch)
        if self.metric == "l2":
            scores = -scores
        return scores, vids, {int(v) for v in vids.ravel() if v >= 0 and int(v) not in self.tombstones}

    def _live(self, row_scores: np.ndarray, row_vids: np.ndarray, found: dict[int, Any], k: int) -> list[tuple[float, int, Any]]:
        """The first k hits of one row whose passage is still live: (score, vid, what `found` holds for it)."""
        out: list[tuple[float, int, Any]] = []
        for score, vid in zip(row_scores, row_vids):
            item = found.get(int(vid)) if vid >= 0 else None
            if item is not None:
                out.append((float(score), int(vid), item))
                if len(out) == k:
                    break
        return out

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """Top-k hits per query vector; scores are inner products, or negative L2 distances."""
        return [[hit for hit, _ in row] for row in self._search_hits(queries, k)]

    def _search_hits(self, queries: np.ndarray, k: int) -> list[list[tuple[Hit, int]]]:
        scores, vids, wanted = self._search_vids(queries, k)
        passages = self.store.fetch(wanted)
        return [[(Hit(p["id"], score, rank, p["title"], p["text"], p["metadata"]), vid)
                 for rank, (score, vid, p) in enumerate(self._live(s, v, passages, k), start=1)]
                for s, v in zip(scores, vids)]

    def search_ids(self, queries: np.ndarray, k: int = 10) -> list[list[tuple[str, float]]]:
        """Top-k (passage id, score) per query: `search` without reading titles, texts and metadata, for
        callers that only need ids (RETRO's neighbour precompute over millions of chunks)."""
        scores, vids, wanted = self._search_vids(queries, k)
        ids = self.store.fetch_ids(wanted)
        return [[(pid, score) for score, _, pid in self._live(s, v, ids, k)] for s, v in zip(scores, vids)]

    def refresh(self, encode: Any, encoder: EncoderInfo, *, batch: int = 4096) -> int:
        """Re-embed every passage with a new model and swap the vectors in as a new version.

        `encode(texts) -> np.ndarray` is called on blocks of passages in store order. Until the new version
        is published the old one serves searches; a process killed meanwhile leaves it untouched."""
        n = max(1, len(self))
        resolved, reason = resolve_spec(parse_spec(self.manifest["spec_requested"]), n, encoder.dim, None)
        manifest = {**self.manifest, "encoder": encoder.to_json(), "spec": resolved.text, "auto_reason": reason,
                    "factory": resolved.factory(encoder.dim, n), "removes_in_place": resolved.removes_in_place}

        def change(store: PassageStore, faiss_index: Any, report: ChangeReport) -> Any:
            store.clear_tombstones()  # the new vectors hold live passages only
            vids: list[int] = []
            blocks: list[np.ndarray] = []
            pending: list[tuple[int, Passage]] = []

            def flush() -> None:
                vids.extend(v for v, _ in pending)
                blocks.append(np.asarray(encode([p.embedding_text() for _, p in pending]), dtype=np.float32))
                pending.clear()

            for item in store.iter_passages():
                pending.append(item)
                if len(pending) >= batch:
                    flush()
            if pending:
                flush()
            fresh = fv.new_index(resolved, encoder.dim, n, self.metric)
            if vids:
                vectors = np.concatenate(blocks)
                fv.train_if_needed(fresh, vectors)
                fv.add(fresh, vectors, np.asarray(vids, dtype=np.int64))
            report.replaced = len(vids)
            return fresh

        return self._mutate(change, manifest=manifest).replaced

    def search_sparse(self, queries: Sequence[str], k: int = 10) -> list[list[Hit]]:
        """Top-k BM25 hits per query text (fewer when fewer passages share a term with the query)."""
        if k <= 0:
            raise UsageError("--k must be positive")
        config = self.sparse_config
        if config is None:
            raise ResourceError(f"{self.root} has no sparse (BM25) side",
                                hint="Rebuild it with `ragkit index build --sparse`, or add one with `ragkit index sparse DIR`.")
        if self._sparse is None:
            self._sparse = SparseSide(self.version_dir, config)
        scores, vids = self._sparse.search(list(queries), k)
        passages = self.store.fetch({int(v) for row in vids for v in row if v >= 0})
        results = []
        for row_scores, row_vids in zip(scores, vids):
            hits: list[Hit] = []
            for score, vid in zip(row_scores, row_vids):
                p = passages.get(int(vid))
                if vid >= 0 and p is not None:
                    hits.append(Hit(p["id"], float(score), len(hits) + 1, p["title"], p["text"], p["metadata"]))
            results.append(hits)
        return results

    def add_sparse(self, config: SparseConfig) -> None:
        """Give an existing index a BM25 side (a new version; vectors and passages unchanged)."""
        self._mutate(lambda store, faiss_index, report: None,
                     manifest={**self.manifest, "sparse": {"library": "bm25s", **config.to_json()}})

    def vectors_for_vids(self, vids: np.ndarray) -> np.ndarray:
        """The stored vectors of the given vids (exact for flat/HNSW; PQ/SQ codes give approximations)."""
        import faiss

        try:
            return fv.reconstruct(self.faiss_index, vids)
        except RuntimeError:
            # IVF indexes reconstruct by id only through a direct map; arbitrary ids need the hashtable kind
            ivf = faiss.extract_index_ivf(self.faiss_index)
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
            return fv.reconstruct(self.faiss_index, vids)

    def search_with_vectors(self, queries: np.ndarray, k: int) -> tuple[list[list[Hit]], np.ndarray]:
        """Hits plus each hit's stored vector, shape (len(queries), k, dim); every query must get k hits."""
        found = self._search_hits(queries, k)
        if any(len(row) < k for row in found):
            raise ResourceError(f"{self.root} holds {len(self)} passages, fewer than the {k} needed per query",
                                hint="Lower --n-docs, or add passages to the index.")
        flat = np.asarray([vid for row in found for _, vid in row], dtype=np.int64)
        hits = [[hit for hit, _ in row] for row in found]
        return hits, self.vectors_for_vids(flat).reshape(len(hits), k, self.dim)

    def get(self, ids: Sequence[str]) -> dict[str, Passage]:
        found = self.store.vids_for(list(ids))
        rows = self.store.fetch(found.values())
        return {r["id"]: Passage(r["id"], r["text"], r["title"], r["metadata"]) for r in rows.values()}

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "path": str(self.root),
            "version": m["version"],
            "passages": m["counts"]["passages"],
            "vectors": m["counts"]["vectors"],
            "tombstones": m["counts"]["tombstones"],
            "spec": m["spec"],
            "factory": m["factory"],
            "metric": m["metric"],
            "embedder": m["encoder"]["name"],
            "dim": m["encoder"]["dim"],
            "normalize": m["encoder"]["normalize"],
            "fingerprint": m["encoder"]["fingerprint"],
            "sparse": m.get("sparse"),
            "bytes_on_disk": sum(f["bytes"] for f in m["files"].values()),
            "created_at": m["created_at"],
            "updated_at": m["updated_at"],
            "device": self.device,
        }


def _rebuild_sparse(staging: Path, store: PassageStore, config: SparseConfig) -> None:
    import shutil

    shutil.rmtree(staging / "sparse", ignore_errors=True)
    build_sparse(staging, ((vid, f"{p.title} {p.text}".strip()) for vid, p in store.iter_passages()), config)
