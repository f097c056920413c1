"""`Index`: the one index abstraction (Faiss vectors + SQLite passages + manifest in one directory).

A version is a base segment plus small delta segments and the vids they delete (`ragkit.index.segments`):
a change of k passages writes one delta of k passages and links every other file over, so it costs O(k)
time and disk; compaction folds deltas back (automatically past the thresholds below, or with
`ragkit index compact`). Every version folder is complete on its own and published atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ragkit import __version__
from ragkit.errors import InputError, Location, ResourceError, UsageError
from ragkit.index import layout
from ragkit.index import vectors as fv
from ragkit.index.builder import SegmentWriter
from ragkit.index.segments import TEMPLATE, Segment, SegmentMeta, link_into, merge_segments, segment_name
from ragkit.index.sparse import SparseConfig, SparseSide, build_sparse, sparse_files
from ragkit.index.spec import IndexSpec, parse_spec, resolve_spec
from ragkit.index.store import PassageStore
from ragkit.io.corpus import Passage
from ragkit.models.encoder import EncoderInfo

FORMAT = "ragkit-index"
FORMAT_VERSION = 2
COMPACT_TOMBSTONE_FRACTION = 0.2  # fold everything back once a fifth of the vectors are dead
MAX_DELTAS = 8  # fold the deltas into one past this many (the base is left alone)
VERIFY_ON_OPEN_BYTES = 16 * 2**20  # files up to this size are checksummed whenever an index opens
HNSW_INSERT_FRACTION = 0.05  # HNSW deltas up to this share of the base are inserted into the loaded graph


class Hit:
    """One search result. Built by a search, its id, title, text and metadata are read from the passage
    store on first access, for every hit of that search at once (one batched read), so a caller that
    only needs scores pays nothing for texts."""

    __slots__ = ("score", "rank", "_vid", "_lookup", "_id", "_title", "_text", "_metadata")

    def __init__(self, id: str, score: float, rank: int, title: str = "", text: str = "",
                 metadata: dict[str, Any] | None = None) -> None:
        self.score, self.rank = score, rank
        self._id, self._title, self._text, self._metadata = id, title, text, metadata or {}
        self._lookup: _Lookup | None = None
        self._vid = -1

    @classmethod
    def _lazy(cls, lookup: "_Lookup", vid: int, score: float, rank: int) -> "Hit":
        hit = cls.__new__(cls)
        hit.score, hit.rank, hit._vid, hit._lookup = score, rank, vid, lookup
        return hit

    def _resolve(self) -> None:
        assert self._lookup is not None
        row = self._lookup.row(self._vid)
        self._id, self._title, self._text, self._metadata = row["id"], row["title"], row["text"], row["metadata"]
        self._lookup = None

    @property
    def id(self) -> str:
        if self._lookup is not None:
            self._resolve()
        return self._id

    @property
    def title(self) -> str:
        if self._lookup is not None:
            self._resolve()
        return self._title

    @property
    def text(self) -> str:
        if self._lookup is not None:
            self._resolve()
        return self._text

    @property
    def metadata(self) -> dict[str, Any]:
        if self._lookup is not None:
            self._resolve()
        return self._metadata

    def to_json(self) -> dict[str, Any]:
        out = {"id": self.id, "score": self.score, "rank": self.rank, "title": self.title, "text": self.text}
        if self.metadata:
            out["metadata"] = self.metadata
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Hit) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return f"Hit(id={self.id!r}, score={self.score:.4f}, rank={self.rank})"


class HitRow(Sequence[Hit]):
    """One query's hits, made into `Hit` objects when the row is first read: a search of 1,000 queries
    then costs what Faiss costs plus a few arrays, not 10,000 Python objects nobody may look at."""

    __slots__ = ("_lookup", "_scores", "_vids", "_hits")

    def __init__(self, lookup: "_Lookup", scores: np.ndarray, vids: np.ndarray) -> None:
        self._lookup, self._scores, self._vids = lookup, scores, vids
        self._hits: list[Hit] | None = None

    def _materialise(self) -> list[Hit]:
        if self._hits is None:
            lookup = self._lookup
            self._hits = [Hit._lazy(lookup, v, s, rank)
                          for rank, (s, v) in enumerate(zip(self._scores.tolist(), self._vids.tolist()), start=1)]
        return self._hits

    def __len__(self) -> int:
        return len(self._vids)

    def __getitem__(self, item: Any) -> Any:
        return self._materialise()[item]

    def __iter__(self) -> Iterator[Hit]:
        return iter(self._materialise())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return repr(self._materialise())


class _Lookup:
    """The passages of one search's hits, read from their segments' stores together on first use (the
    segments of the version searched, even if the Index has moved on to a newer one since)."""

    def __init__(self, starts: np.ndarray, segments: list[Segment], vids: Any) -> None:
        self.starts, self.segments, self.vids = starts, segments, vids
        self.rows: dict[int, dict[str, Any]] | None = None

    def row(self, vid: int) -> dict[str, Any]:
        if self.rows is None:
            self.rows = _fetch(self.starts, self.segments, self.vids)
        return self.rows[vid]


def _fetch(starts: np.ndarray, segments: list[Segment], vids: Any, *, ids_only: bool = False) -> dict[int, Any]:
    """vid -> stored row (or id), one batched read per segment."""
    wanted = (np.unique(vids).astype(np.int64) if isinstance(vids, np.ndarray)
              else np.fromiter((int(v) for v in vids), dtype=np.int64))
    out: dict[int, Any] = {}
    if not len(wanted):
        return out
    which = np.searchsorted(starts, wanted, side="right") - 1
    for s in np.unique(which):
        if s < 0:
            continue
        store = segments[s].store
        group = wanted[which == s].tolist()
        out.update(store.fetch_ids(group) if ids_only else store.fetch(group))
    return out


class ChangeReport:
    def __init__(self) -> None:
        self.added = 0
        self.replaced = 0
        self.removed = 0
        self.missing: list[str] = []
        self.compacted = False


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


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Index:
    """Open with `Index.open(dir)`, create with `Index.build(...)` (or stream with `Index.create(...)`);
    every change is a new atomic version."""

    def __init__(self, root: Path, version_dir: Path, manifest: dict[str, Any], segments: list[Segment],
                 dead: np.ndarray) -> None:
        self.root = root
        self.version_dir = version_dir
        self.manifest = manifest
        self.segments = segments
        self.dead = dead  # sorted vids whose passages were removed or replaced (tombstones)
        self.tombstones = set(dead.tolist())
        self.device = "cpu"
        self._sparse: SparseSide | None = None
        self._searcher_cache: list[Segment] | None = None
        live = [s for s in segments if s.rows]
        self._vid_starts = np.asarray([s.meta.vid_min for s in live], dtype=np.int64)
        self._by_start = live
        for segment in live:
            lo, hi = np.searchsorted(dead, [segment.meta.vid_min, int(segment.meta.vid_max) + 1])
            segment.set_dead(dead[lo:hi])
            segment.set_search_params(self.spec.search_params())

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
            # small files (deltas, deletes, template) are hashed on every open: a corrupted tombstone list
            # would silently bring removed passages back. The base is checked by size; `--verify` hashes all.
            if meta["bytes"] <= VERIFY_ON_OPEN_BYTES and meta.get("sha256") and sha256_file(path) != meta["sha256"]:
                raise ResourceError(f"{path}: checksum mismatch (the file changed after it was written)",
                                    hint="Restore it, or rebuild the index.")
        fv.set_threads(threads)
        if int(manifest["format_version"]) == 1:
            manifest, dead = _upgrade_format1(version_dir, manifest)
        else:
            dead = _read_deletes(version_dir, manifest)
        segments = [Segment(version_dir, SegmentMeta.from_json(m), manifest["metric"]) for m in manifest["segments"]]
        index = cls(root, version_dir, manifest, segments, dead)
        if device != "cpu":
            index._to_device(device)
        return index

    def _to_device(self, device: str) -> None:
        for segment in self.segments:
            segment.want_device = device
            if segment.meta.vectors:
                segment.faiss  # noqa: B018  (load now, to say where it lives)
        placed = {s.device for s in self.segments if s.meta.vectors}
        self.device = device if placed == {device} else "cpu"

    def verify(self) -> list[str]:
        """Compare every file's sha256 with the manifest; returns the names that differ."""
        return [
            name
            for name, meta in self.manifest["files"].items()
            if sha256_file(self.version_dir / name) != meta["sha256"]
        ]

    # -- building --------------------------------------------------------------------------------
    @classmethod
    @contextlib.contextmanager
    def create(
        cls,
        root: str | Path,
        encoder: EncoderInfo,
        *,
        spec: str | IndexSpec = "flat",
        metric: str = "ip",
        max_memory: int | None = None,
        overwrite: bool = False,
        threads: int | None = None,
        device: str = "cpu",
        sparse: SparseConfig | None = None,
        source: str = "<passages>",
    ) -> Iterator["IndexBuild"]:
        """Build an index in blocks: `with Index.create(...) as build: build.add(passages, vectors)` as
        often as needed; the index is published when the block ends (`build.index` opens it). Nothing
        is published if the block raises."""
        root = Path(root)
        if metric not in fv.METRICS:
            raise UsageError(f"--metric {metric}: expected one of {', '.join(fv.METRICS)}")
        if root.exists() and not root.is_dir():
            raise UsageError(f"{root}: exists and is not a directory")
        if root.is_dir() and any(root.iterdir()) and not cls.exists(root):
            raise UsageError(f"{root}: exists, is not empty and is not a ragkit index; refusing to write into it")
        if cls.exists(root) and not overwrite:
            raise UsageError(f"{root}: an index is already there", hint="Use --overwrite, or `ragkit index add`.")
        parsed = parse_spec(spec) if isinstance(spec, str) else spec
        fv.set_threads(threads)
        with layout.writer_lock(root):
            layout.remove_stale(root)
            version = layout.next_version(root)
            staging = layout.new_staging_dir(root, version)
            writer = SegmentWriter(staging, segment_name(version), encoder.dim, 1, source=source)
            build = IndexBuild(writer)
            try:
                yield build
                if writer.rows == 0:
                    raise InputError(Location(source), "empty corpus: no passages to index")
                if writer.vectors != writer.rows:
                    raise InputError(Location(source), f"{writer.rows} passages but {writer.vectors} vectors")
                resolved, reason = resolve_spec(parsed, writer.rows, encoder.dim, max_memory)
                manifest = {
                    "format": FORMAT, "format_version": FORMAT_VERSION, "ragkit_version": __version__,
                    "created_at": _now(), "encoder": encoder.to_json(), "metric": metric, "spec": resolved.text,
                    "spec_requested": parsed.text, "auto_reason": reason,
                    "factory": resolved.factory(encoder.dim, writer.rows),
                }
                if sparse is not None:
                    manifest["sparse"] = {"library": "bm25s", **sparse.to_json()}
                meta = _write_base(writer, resolved, encoder.dim, metric, device)
                draft = _Draft(root, staging, version, segments=[], dead=set(), next_vid=writer.next_vid, files={})
                draft.new_segment(meta)
                draft.new_file(TEMPLATE)
                draft.publish(manifest)
            except BaseException:
                writer.abort()
                shutil.rmtree(staging, ignore_errors=True)
                raise
        build.index = cls.open(root, device=device)

    @classmethod
    def build(
        cls,
        root: str | Path,
        passages: Sequence[Passage],
        vectors: np.ndarray,
        encoder: EncoderInfo,
        **options: Any,
    ) -> "Index":
        """Create an index from passages and their vectors (row i embeds passages[i]); options as `create`
        (spec, metric, max_memory, overwrite, threads, device, sparse)."""
        if not passages:
            raise InputError(Location("<passages>"), "empty corpus: no passages to index")
        _check_unique(passages)
        _check_vectors(passages, vectors, encoder.dim)
        with cls.create(root, encoder, **options) as build:
            build.add(passages, vectors)
        assert build.index is not None
        return build.index

    # -- changing --------------------------------------------------------------------------------
    def _change(self, edit: Callable[["_Draft", ChangeReport], None], *, manifest: dict[str, Any] | None = None,
                auto_compact: bool = True) -> ChangeReport:
        """Stage a new version from this one (its segments linked over), let `edit` add to it, compact when
        the thresholds say so, and publish it."""
        manifest = dict(self.manifest if manifest is None else manifest)
        with layout.writer_lock(self.root):
            if layout.current_version_dir(self.root) != self.version_dir:
                raise ResourceError(f"{self.root}: changed by another writer since it was opened; open it again")
            layout.remove_stale(self.root)
            version = layout.next_version(self.root)
            staging = layout.new_staging_dir(self.root, version)
            try:
                draft = _Draft(self.root, staging, version, segments=[(s.meta, self.version_dir) for s in self.segments],
                               dead=set(self.tombstones), next_vid=int(self.manifest["next_vid"]),
                               files={n: (self.version_dir, m) for n, m in self.manifest["files"].items()
                                      if not n.startswith("sparse/")},
                               metric=self.metric)
                self._ensure_template(draft)
                report = ChangeReport()
                edit(draft, report)
                if auto_compact:
                    report.compacted = draft.auto_compact()
                draft.publish(manifest)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        self._reopen()
        return report

    def _ensure_template(self, draft: "_Draft") -> None:
        """A format-1 index has no template: take the base's trained state, emptied."""
        if TEMPLATE in draft.files:
            return
        import faiss

        template = faiss.clone_index(self.segments[0].cpu_faiss())
        template.reset()
        faiss.write_index(template, str(draft.staging / TEMPLATE))
        draft.new_file(TEMPLATE)

    def _reopen(self) -> None:
        """Open the version just published, keeping the Faiss indexes already read for the segments it
        shares with this one (segments are immutable: same name, same vectors)."""
        device = self.device  # the old segments close when the last hit that may read them is gone
        reopened = Index.open(self.root)
        loaded = {s.meta.name: s for s in self.segments if s.loaded}
        names = {s.meta.name for s in reopened.segments}
        for segment in reopened.segments:
            old = loaded.get(segment.meta.name)
            # a base holding merged deltas is only reused while the new version still has all of them
            if old is not None and old.meta == segment.meta and old.merged <= names:
                segment.adopt(old)
        if device != "cpu":
            reopened._to_device(device)
        self.__dict__.update(reopened.__dict__)

    def _live_vids_for(self, ids: Sequence[str]) -> dict[str, int]:
        """id -> vid of the live passages among `ids` (newest segment first)."""
        found: dict[str, int] = {}
        wanted = list(dict.fromkeys(ids))
        for segment in reversed(self._by_start):
            if len(found) == len(wanted):
                break
            rest = [i for i in wanted if i not in found]
            for pid, vid in segment.store.vids_for(rest).items():
                if vid not in self.tombstones:
                    found[pid] = vid
        return found

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

        def edit(draft: _Draft, report: ChangeReport) -> None:
            existing = self._live_vids_for([p.id for p in passages])
            draft.add_delta(passages, vectors, deletes=list(existing.values()))
            report.replaced = len(existing)
            report.added = len(passages) - len(existing)

        return self._change(edit, manifest=manifest)

    def remove(self, ids: Sequence[str]) -> ChangeReport:
        def edit(draft: _Draft, report: ChangeReport) -> None:
            found = self._live_vids_for(ids)
            report.missing = [i for i in dict.fromkeys(ids) if i not in found]
            if found:
                draft.add_delta([], np.zeros((0, self.dim), np.float32), deletes=list(found.values()))
            report.removed = len(found)

        return self._change(edit)

    def compact(self) -> ChangeReport:
        """Fold every segment into one base and drop the tombstones (a new version)."""
        def edit(draft: _Draft, report: ChangeReport) -> None:
            draft.compact(everything=True)
            report.compacted = True

        return self._change(edit, auto_compact=False)

    def refresh(self, encode: Any, encoder: EncoderInfo, *, batch: int = 4096) -> int:
        """Re-embed every passage with a new model and swap the vectors in as a new version.

        `encode(texts) -> np.ndarray` is called on blocks of passages in store order. Until the new version
        is published the old one serves searches; a process killed meanwhile leaves it untouched."""
        n = max(1, len(self))
        resolved, reason = resolve_spec(parse_spec(self.manifest["spec_requested"]), n, encoder.dim, None)
        manifest = {**self.manifest, "encoder": encoder.to_json(), "spec": resolved.text, "auto_reason": reason,
                    "factory": resolved.factory(encoder.dim, n)}
        count = 0

        def edit(draft: _Draft, report: ChangeReport) -> None:
            nonlocal count
            writer = SegmentWriter(draft.staging, draft.next_name(), encoder.dim, draft.next_vid)
            block: list[tuple[int, Passage]] = []

            def flush() -> None:
                vectors = np.asarray(encode([p.embedding_text() for _, p in block]), dtype=np.float32)
                writer.add([p for _, p in block], vectors, vids=[v for v, _ in block])
                block.clear()

            try:
                for item in self.iter_passages():
                    block.append(item)
                    if len(block) >= batch:
                        flush()
                if block:
                    flush()
                count = writer.rows
                meta = _write_base(writer, resolved, encoder.dim, self.metric, "cpu")
            except BaseException:
                writer.abort()
                raise
            draft.replace_all(meta)
            draft.new_file(TEMPLATE)

        self._change(edit, manifest=manifest, auto_compact=False)
        return count

    def add_sparse(self, config: SparseConfig) -> None:
        """Give an existing index a BM25 side (a new version; vectors and passages unchanged)."""
        self._change(lambda draft, report: None, auto_compact=False,
                     manifest={**self.manifest, "sparse": {"library": "bm25s", **config.to_json()}})

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
        for segment in self.segments:
            segment.set_search_params(params)

    def _search_vids(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top k live (score, vid) per query over every segment; -1 vids (score -inf) pad short rows."""
        if k <= 0:
            raise UsageError("--k must be positive")
        queries = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        if queries.shape[1] != self.dim:
            raise ResourceError(f"query vectors have dimension {queries.shape[1]}, the index holds {self.dim}")
        parts = [segment.search(queries, k) for segment in self._searchers()]
        parts = [p for p in parts if p[1].shape[1]]
        if not parts:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if len(parts) == 1:
            return parts[0]
        scores = np.concatenate([p[0] for p in parts], axis=1)
        vids = np.concatenate([p[1] for p in parts], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(vids, order, 1)

    def _searchers(self) -> list[Segment]:
        """The segments a search runs on. IVF deltas share the base's coarse quantiser (they are clones of
        its template), so their lists are merged into the loaded base in memory (`merge_from`, O(delta);
        the files are untouched): one search, one coarse quantisation of the queries, instead of one per
        delta. HNSW deltas up to 5% of the base are inserted into the loaded graph (once per open, about
        the cost of adding them to an HNSW index); flat deltas are searched on their own."""
        if self._searcher_cache is None:
            self._searcher_cache = self._merge_ivf_deltas()
        return self._searcher_cache

    def _merge_ivf_deltas(self) -> list[Segment]:
        import faiss

        segments = [s for s in self._by_start if s.meta.vectors]
        if len(segments) < 2:
            return segments
        base = segments[0]
        ivf = isinstance(base.faiss, faiss.IndexIVF)
        hnsw = fv.is_hnsw(base.faiss)
        delta_rows = sum(d.rows for d in segments[1:] if d.meta.name not in base.merged)
        if base.device != "cpu" or not (ivf or (hnsw and delta_rows <= HNSW_INSERT_FRACTION * base.rows)):
            return segments
        separate = []
        for delta in segments[1:]:
            if delta.meta.name in base.merged:
                continue
            try:
                if ivf:
                    base.faiss.merge_from(faiss.clone_index(delta.faiss), 0)
                else:  # insert the delta's vectors into the loaded graph (HNSW cannot merge graphs)
                    source = delta.faiss
                    ids = faiss.vector_to_array(source.id_map).astype(np.int64)
                    fv.add(base.faiss, source.index.reconstruct_n(0, source.ntotal), ids)
                base.merged.add(delta.meta.name)
            except RuntimeError:  # not the base's quantiser (or storage): search it on its own
                separate.append(delta)
        covered = [base.meta] + [d.meta for d in segments[1:] if d.meta.name in base.merged]
        keep = np.zeros(len(self.dead), dtype=bool)
        for meta in covered:
            keep |= (self.dead >= int(meta.vid_min)) & (self.dead <= int(meta.vid_max))
        base.set_dead(self.dead[keep])
        return [base, *separate]

    def _segment_of(self, vids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._vid_starts, vids, side="right") - 1

    def _fetch(self, vids: Any, *, ids_only: bool = False) -> dict[int, Any]:
        return _fetch(self._vid_starts, self._by_start, vids, ids_only=ids_only)

    def _hits(self, scores: np.ndarray, vids: np.ndarray) -> list[HitRow]:
        valid = (vids >= 0).sum(axis=1).tolist()  # the -1 padding is always at the end of a row
        lookup = _Lookup(self._vid_starts, self._by_start, vids[vids >= 0])
        return [HitRow(lookup, scores[i, :n], vids[i, :n]) for i, n in enumerate(valid)]

    def _rows_of_hits(self, scores: np.ndarray, vids: np.ndarray) -> list[list[tuple[float, int]]]:
        out = []
        for row_scores, row_vids in zip(scores.tolist(), vids.tolist()):
            out.append([(s, v) for s, v in zip(row_scores, row_vids) if v >= 0])
        return out

    def search(self, queries: np.ndarray, k: int = 10) -> list[HitRow]:
        """Top-k hits per query vector; scores are inner products, or negative L2 distances. Passage
        fields are read on first access (see `Hit`)."""
        return self._hits(*self._search_vids(queries, k))

    def search_ids(self, queries: np.ndarray, k: int = 10) -> list[list[tuple[str, float]]]:
        """Top-k (passage id, score) per query: `search` without reading titles, texts and metadata, for
        callers that only need ids (RETRO's neighbour precompute over millions of chunks)."""
        scores, vids = self._search_vids(queries, k)
        rows = self._rows_of_hits(scores, vids)
        ids = self._fetch({v for row in rows for _, v in row}, ids_only=True)
        return [[(ids[v], s) for s, v in row] for row in rows]

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
        passages = self._fetch({int(v) for row in vids for v in row if v >= 0 and int(v) not in self.tombstones})
        results = []
        for row_scores, row_vids in zip(scores, vids):
            hits: list[Hit] = []
            for score, vid in zip(row_scores, row_vids):
                p = passages.get(int(vid))
                if vid >= 0 and p is not None:
                    hits.append(Hit(p["id"], float(score), len(hits) + 1, p["title"], p["text"], p["metadata"]))
            results.append(hits)
        return results

    def vectors_for_vids(self, vids: np.ndarray) -> np.ndarray:
        """The stored vectors of the given vids (exact for flat/HNSW; PQ/SQ codes give approximations)."""
        vids = np.asarray(vids, dtype=np.int64)
        out = np.empty((len(vids), self.dim), np.float32)
        which = self._segment_of(vids)
        for s in np.unique(which):
            mask = which == s
            out[mask] = _reconstruct(self._by_start[s].faiss, vids[mask])
        return out

    def search_with_vectors(self, queries: np.ndarray, k: int) -> tuple[list[HitRow], np.ndarray]:
        """Hits plus each hit's stored vector, shape (len(queries), k, dim); every query must get k hits."""
        scores, vids = self._search_vids(queries, k)
        if vids.shape[1] < k or (vids < 0).any():
            raise ResourceError(f"{self.root} holds {len(self)} passages, fewer than the {k} needed per query",
                                hint="Lower --n-docs, or add passages to the index.")
        hits = self._hits(scores, vids)
        return hits, self.vectors_for_vids(vids.ravel()).reshape(len(hits), k, self.dim)

    def get(self, ids: Sequence[str]) -> dict[str, Passage]:
        rows = self._fetch(self._live_vids_for(list(ids)).values())
        return {r["id"]: Passage(r["id"], r["text"], r["title"], r["metadata"]) for r in rows.values()}

    def iter_passages(self) -> Iterator[tuple[int, Passage]]:
        """Every live (vid, passage), segment by segment in vid order."""
        for segment in self._by_start:
            for vid, passage in segment.store.iter_passages():
                if vid not in self.tombstones:
                    yield vid, passage

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "path": str(self.root),
            "version": m["version"],
            "passages": m["counts"]["passages"],
            "vectors": m["counts"]["vectors"],
            "tombstones": m["counts"]["tombstones"],
            "segments": len(m["segments"]),
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


class IndexBuild:
    """What `Index.create` yields: add blocks of passages with their vectors; `index` once published."""

    def __init__(self, writer: SegmentWriter) -> None:
        self._writer = writer
        self.index: Index | None = None

    @property
    def rows(self) -> int:
        return self._writer.rows

    def add(self, passages: Sequence[Passage], vectors: np.ndarray, *, lines: Sequence[int] | None = None,
            source: str | None = None) -> None:
        """Store a block; `lines` (and the file they are in, `source`) name a duplicate id's line."""
        if source is not None:
            self._writer.source = source
        self._writer.add(passages, vectors, lines=lines)

    def add_passages(self, passages: Sequence[Passage], *, lines: Sequence[int] | None = None,
                     source: str | None = None) -> None:
        """Store passages whose vectors `add_vectors` gives later, by vid (`store.vids_for` finds them)."""
        if source is not None:
            self._writer.source = source
        self._writer.add_passages(passages, lines=lines)

    def add_vectors(self, vectors: np.ndarray, vids: Sequence[int]) -> None:
        self._writer.add_vectors(vectors, vids)

    @property
    def store(self) -> PassageStore:
        """The passages stored so far (an open, writable store in the staging folder)."""
        return self._writer.store

    @property
    def dim(self) -> int:
        return self._writer.dim


def _write_base(writer: SegmentWriter, spec: IndexSpec, dim: int, metric: str, device: str) -> SegmentMeta:
    """Train a new Faiss index of `spec` on the writer's vectors, save its empty trained state as the
    template for later deltas, and fill it."""
    import faiss

    faiss_index = fv.new_index(spec, dim, writer.rows, metric)
    target, where = fv.to_device(faiss_index, device) if device != "cpu" else (faiss_index, "cpu")
    if not target.is_trained:
        from ragkit.index.builder import _Rows
        from ragkit.io.mapped import drop_pages

        blocks = writer.blocks()
        fv.train_if_needed(target, _Rows(blocks, dim))
        for block in blocks:
            drop_pages(block)
    faiss.write_index(fv.to_cpu(target), str(writer.staging / TEMPLATE))
    return writer.finish(target, train=False)


def _reconstruct(faiss_index: Any, vids: np.ndarray) -> np.ndarray:
    import faiss

    try:
        return fv.reconstruct(faiss_index, vids)
    except RuntimeError:
        # IVF indexes reconstruct by id only through a direct map; arbitrary ids need the hashtable kind
        ivf = faiss.extract_index_ivf(faiss_index)
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        return fv.reconstruct(faiss_index, vids)


def _read_deletes(version_dir: Path, manifest: dict[str, Any]) -> np.ndarray:
    parts = [np.load(version_dir / m["deletes"], allow_pickle=False) for m in manifest["segments"] if m.get("deletes")]
    return np.unique(np.concatenate(parts).astype(np.int64)) if parts else np.zeros(0, np.int64)


def _upgrade_format1(version_dir: Path, manifest: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray]:
    """Read a format-1 version (one vectors.faiss, one passages.sqlite with a tombstones table) as one
    segment; the next change writes format 2 around the same files."""
    store = PassageStore(version_dir / layout.PASSAGES, readonly=True)
    try:
        lo, hi = store.conn.execute("SELECT MIN(vid), MAX(vid) FROM passages").fetchone()
        seq = store.conn.execute("SELECT seq FROM sqlite_sequence WHERE name='passages'").fetchone()
        dead = np.asarray(sorted(store.legacy_tombstones()), dtype=np.int64)
    finally:
        store.close()
    top = max(int(hi or 0), int(seq[0]) if seq else 0, int(dead.max()) if len(dead) else 0)
    low = min(int(lo or 1), int(dead.min()) if len(dead) else int(lo or 1))
    rows = int(manifest["counts"]["vectors"])
    segment = SegmentMeta("v1", rows, low, top, layout.VECTORS, layout.PASSAGES)
    upgraded = {**manifest, "segments": [segment.to_json()], "next_vid": top + 1, "legacy_dead": dead.tolist()}
    return upgraded, dead


class _Draft:
    """A version being staged: its segments (each with the folder its files are in now), dead vids and
    files. Files taken over from the previous version keep their recorded checksums (never recomputed
    from what is on disk, so a corrupted file cannot be laundered into a fresh manifest)."""

    def __init__(self, root: Path, staging: Path, version: int, *, segments: list[Any], dead: set[int],
                 next_vid: int, files: dict[str, tuple[Path, dict[str, Any]]], metric: str = "ip") -> None:
        self.root, self.staging, self.version = root, staging, version
        self.segments: list[tuple[SegmentMeta, Path]] = list(segments)
        self.dead = dead
        self.next_vid = next_vid
        self.files = dict(files)  # name -> (folder it is in, {bytes, sha256} or {} when new)
        self.metric = metric
        self._names = 0

    def next_name(self) -> str:
        self._names += 1
        return segment_name(self.version) + ("" if self._names == 1 else f"-{self._names}")

    def new_file(self, name: str) -> None:
        self.files[name] = (self.staging, {})

    def new_segment(self, meta: SegmentMeta) -> None:
        self.segments.append((meta, self.staging))
        for name in meta.files:
            self.new_file(name)

    def add_delta(self, passages: Sequence[Passage], vectors: np.ndarray, *, deletes: Sequence[int]) -> None:
        """One delta segment: the new passages (vids from the counter) and the vids they replace or remove."""
        import faiss

        name = self.next_name()
        meta = SegmentMeta(name, 0)
        if len(passages):
            writer = SegmentWriter(self.staging, name, vectors.shape[1], self.next_vid)
            try:
                writer.add(passages, np.asarray(vectors, dtype=np.float32))
                template_dir = self.files[TEMPLATE][0]
                meta = writer.finish(fv.delta_index(faiss.read_index(str(template_dir / TEMPLATE))), train=False)
            except BaseException:
                writer.abort()
                raise
            self.next_vid = writer.next_vid
        if len(deletes):
            np.save(self.staging / f"{name}.deletes.npy", np.asarray(sorted(deletes), dtype=np.int64))
            meta = SegmentMeta(meta.name, meta.rows, meta.vid_min, meta.vid_max, meta.vectors, meta.passages,
                               f"{name}.deletes.npy")
            self.dead.update(int(v) for v in deletes)
        if meta.files:
            self.new_segment(meta)

    def replace_all(self, meta: SegmentMeta) -> None:
        """A new base replaces every segment (refresh)."""
        self._drop_segments(len(self.segments))
        self.dead = set()
        self.new_segment(meta)

    def _drop_segments(self, count: int) -> list[tuple[SegmentMeta, Path]]:
        dropped, self.segments = self.segments[len(self.segments) - count :], self.segments[: len(self.segments) - count]
        for meta, _ in dropped:
            for name in meta.files:
                self.files.pop(name, None)
        return dropped

    def auto_compact(self) -> bool:
        total = sum(m.rows for m, _ in self.segments)
        base_rows = self.segments[0][0].rows if self.segments else 0
        deltas = self.segments[1:]
        if self.dead and len(self.dead) >= COMPACT_TOMBSTONE_FRACTION * max(1, total):
            self.compact(everything=True)
        elif sum(m.rows for m, _ in deltas) > base_rows:
            self.compact(everything=True)
        elif len(deltas) > MAX_DELTAS:
            self.compact(everything=False)
        else:
            return False
        return True

    def compact(self, *, everything: bool) -> None:
        """Merge every segment (or every delta) into one; dead vids inside them are dropped for good."""
        import faiss

        count = len(self.segments) if everything else len(self.segments) - 1
        if count <= 0 or (count == 1 and not any(m.deletes for m, _ in self.segments[-count:]) and not self.dead):
            return
        merging = self.segments[-count:]
        kept = self.segments[:-count]
        open_segments = [Segment(folder, meta, self.metric) for meta, folder in merging]
        in_merged = np.asarray(sorted(v for v in self.dead if any(
            m.rows and m.vid_min <= v <= m.vid_max for m, _ in merging)), dtype=np.int64)
        still_dead = sorted(v for v in self.dead if v not in set(in_merged.tolist()))
        template = faiss.read_index(str(self.files[TEMPLATE][0] / TEMPLATE))
        name = self.next_name()
        try:
            merged = merge_segments(open_segments, in_merged, template)
            store = PassageStore(self.staging / f"{name}.sqlite", bulk=True)
            from ragkit.index.store import copy_live_rows

            rows = copy_live_rows(store, [folder / m.passages for m, folder in merging if m.passages], in_merged)
            lo_hi = store.conn.execute("SELECT MIN(vid), MAX(vid) FROM passages").fetchone()
            store.close()
        finally:
            for segment in open_segments:
                segment.close()
        self._drop_segments(count)
        files: dict[str, str | None] = {"vectors": None, "passages": None, "deletes": None}
        if rows:
            faiss.write_index(merged, str(self.staging / f"{name}.faiss"))
            files["vectors"], files["passages"] = f"{name}.faiss", f"{name}.sqlite"
        else:
            (self.staging / f"{name}.sqlite").unlink()
        if still_dead:
            np.save(self.staging / f"{name}.deletes.npy", np.asarray(still_dead, dtype=np.int64))
            files["deletes"] = f"{name}.deletes.npy"
        for meta, _ in kept:  # their deletes are now all recorded by the merged segment
            if meta.deletes:
                self.files.pop(meta.deletes, None)
        self.segments = [(SegmentMeta(m.name, m.rows, m.vid_min, m.vid_max, m.vectors, m.passages, None), f)
                         for m, f in kept]
        self.dead = set(still_dead)
        if rows or still_dead:
            self.new_segment(SegmentMeta(name, rows, lo_hi[0] if rows else None, lo_hi[1] if rows else None, **files))

    def publish(self, manifest: dict[str, Any]) -> Path:
        """Link the files taken over, rebuild the BM25 side, write the manifest, publish the version."""
        for name, (folder, _) in self.files.items():
            if folder != self.staging:
                link_into(folder, [name], self.staging)
        manifest = {k: v for k, v in manifest.items() if k not in ("legacy_dead", "removes_in_place")}
        manifest["format_version"] = FORMAT_VERSION
        segments = [meta for meta, _ in self.segments]
        if manifest.get("sparse"):  # bm25s cannot update in place: rebuilt from the live passages
            _rebuild_sparse(self.staging, segments, self.dead, SparseConfig.from_json(manifest["sparse"]))
        manifest["updated_at"] = _now()
        manifest["version"] = self.version
        manifest["segments"] = [m.to_json() for m in segments]
        manifest["next_vid"] = self.next_vid
        total = sum(m.rows for m in segments)
        manifest["counts"] = {"passages": total - len(self.dead), "vectors": total, "tombstones": len(self.dead)}
        recorded = {name: meta for name, (folder, meta) in self.files.items() if meta}
        names = sorted({*self.files, *sparse_files(self.staging)})
        manifest["files"] = {
            name: recorded.get(name) or {"bytes": (self.staging / name).stat().st_size,
                                         "sha256": sha256_file(self.staging / name)}
            for name in names
        }
        (self.staging / layout.MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        return layout.publish(self.root, self.staging, self.version)


def _rebuild_sparse(staging: Path, segments: list[SegmentMeta], dead: set[int], config: SparseConfig) -> None:
    shutil.rmtree(staging / "sparse", ignore_errors=True)

    def docs() -> Iterator[tuple[int, str]]:
        for meta in segments:
            if not meta.passages:
                continue
            store = PassageStore(staging / meta.passages, readonly=True)
            try:
                for vid, p in store.iter_passages():
                    if vid not in dead:
                        yield vid, f"{p.title} {p.text}".strip()
            finally:
                store.close()

    build_sparse(staging, docs(), config)
