"""`Index`: the one index abstraction (Faiss vectors + SQLite passages + manifest in one directory).

A version is a base segment plus small delta segments and the vids they delete (`ragkit.index.segments`):
a change of k passages writes one delta of k passages and links every other file over, so it costs O(k)
time and disk; compaction folds deltas back (automatically past the thresholds below, or with
`ragkit index compact`). Every version folder is complete on its own and published atomically.
"""

from __future__ import annotations

import contextlib
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
from ragkit.index.builder import SegmentWriter, check_vectors
from ragkit.index.draft import (  # noqa: F401  (the thresholds are part of this module's documented surface)
    COMPACT_TOMBSTONE_FRACTION,
    FORMAT_VERSION,
    MAX_DELTAS,
    Draft,
    utc_now,
    write_base,
)
from ragkit.index.exact import ExactVectors
from ragkit.index.hits import Hit, HitRow, PassageLookup, fetch_rows
from ragkit.index.manifest_checks import check_manifest
from ragkit.index.segments import TEMPLATE, Segment, SegmentMeta, SharedTemplate, segment_name
from ragkit.index.sparse import LegacySparseSide, SegmentedBM25, SparseConfig
from ragkit.index.spec import AUTO_REFINE, IndexSpec, parse_spec, resolve_spec
from ragkit.index.store import PassageStore
from ragkit.io.atomic import HASH_ON_READ_BYTES, names_full_disk, sha256_file
from ragkit.io.corpus import Passage
from ragkit.index.encoder_info import EncoderInfo

FORMAT = "ragkit-index"
KEPT = "the change was not published (the staged version is removed) and the last version is intact"
VERIFY_ON_OPEN_BYTES = HASH_ON_READ_BYTES  # files up to this size are checksummed whenever an index opens
HNSW_INSERT_FRACTION = 0.05  # HNSW deltas up to this share of the base are inserted into the loaded graph


class ChangeReport:
    def __init__(self) -> None:
        self.added = 0
        self.replaced = 0
        self.removed = 0
        self.missing: list[str] = []
        self.compacted = False


def _check_unique(passages: Sequence[Passage]) -> None:
    seen: set[str] = set()
    for i, p in enumerate(passages, start=1):
        if p.id in seen:
            raise InputError(Location("<passages>", i, "id"), f"duplicate id '{p.id}'")
        seen.add(p.id)



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
        self._sparse: SegmentedBM25 | LegacySparseSide | None = None
        self._searcher_cache: list[Segment] | None = None
        live = [s for s in segments if s.rows]
        self._vid_starts = np.asarray([s.meta.vid_min for s in live], dtype=np.int64)
        self._by_start = live
        params = self.spec.search_params()
        self.refine = self.spec.refine  # candidates re-ranked exactly (0: the codes' order is final)
        self.exact = ExactVectors(version_dir, [p for s in segments for p in s.meta.exact], self.dim)
        for segment in live:
            lo, hi = np.searchsorted(dead, [segment.meta.vid_min, int(segment.meta.vid_max) + 1])
            segment.set_dead(dead[lo:hi])
            segment.set_search_params(params)

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
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ResourceError(f"{manifest_path}: not a ragkit index manifest")
        try:
            return cls._open_manifest(root, version_dir, manifest, device=device, threads=threads)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            what = f"missing key {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
            raise ResourceError(f"{manifest_path}: malformed manifest ({what})",
                                hint="Restore the index folder, or rebuild it.") from None

    @classmethod
    def _open_manifest(cls, root: Path, version_dir: Path, manifest: dict[str, Any], *, device: str,
                       threads: int | None) -> "Index":
        manifest_path = version_dir / layout.MANIFEST
        if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
            raise ResourceError(f"{manifest_path}: unsupported index format {manifest.get('format_version')}")
        for segment in manifest.get("segments", []):
            for key in ("vectors", "passages", "deletes"):
                if segment.get(key) and segment[key] not in manifest["files"]:
                    raise ResourceError(f"{manifest_path}: segment file '{segment[key]}' has no checksum entry")
        for name, meta in manifest["files"].items():
            path = layout.inside(version_dir, name)
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
            check_manifest(manifest, version_dir, manifest_path)
            dead = _read_deletes(version_dir, manifest)
        metas = [SegmentMeta.from_json(m) for m in manifest["segments"]]
        template = SharedTemplate(version_dir / TEMPLATE) if any(m.shares_quantizer for m in metas) else None
        segments = [Segment(version_dir, meta, manifest["metric"], template) for meta in metas]
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
        max_build_time: float | None = None,
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
        cls.check_target(root, metric=metric, overwrite=overwrite)
        parsed = parse_spec(spec) if isinstance(spec, str) else spec
        fv.set_threads(threads)
        with names_full_disk(root, kept=KEPT), layout.writer_lock(root):
            layout.remove_stale(root)
            version = layout.next_version(root)
            staging = layout.new_staging_dir(root, version)
            writer = SegmentWriter(staging, segment_name(version), encoder.dim, 1, source=source)
            build = IndexBuild(writer)
            began = time.perf_counter()
            try:
                yield build
                if writer.rows == 0:
                    raise InputError(Location(source), "empty corpus: no passages to index")
                if writer.vectors != writer.rows:
                    raise InputError(Location(source), f"{writer.rows} passages but {writer.vectors} vectors")
                resolved, reason = resolve_spec(parsed, writer.rows, encoder.dim, max_memory, max_build_time)
                manifest = {
                    "format": FORMAT, "format_version": FORMAT_VERSION, "ragkit_version": __version__,
                    "created_at": utc_now(), "encoder": encoder.to_json(), "metric": metric, "spec": resolved.text,
                    "spec_requested": parsed.text, "auto_reason": reason,
                    "factory": resolved.factory(encoder.dim, writer.rows),
                }
                if sparse is not None:
                    manifest["sparse"] = {"library": "bm25s", **sparse.to_json()}
                meta = write_base(writer, resolved, encoder.dim, metric, device)
                phases = {"input": time.perf_counter() - began - sum(writer.phase_seconds.values()),
                          **writer.phase_seconds}  # input: reading and checking what the caller gave
                manifest["build_phases"] = {k: round(v, 2) for k, v in phases.items()}
                draft = Draft(root, staging, version, segments=[], dead=set(), next_vid=writer.next_vid, files={})
                draft.new_segment(meta)
                draft.new_file(TEMPLATE)
                draft.publish(manifest)
            except BaseException:
                writer.abort()
                shutil.rmtree(staging, ignore_errors=True)
                raise
        build.index = cls.open(root, device=device)

    @classmethod
    def check_target(cls, root: str | Path, *, metric: str = "ip", overwrite: bool = False) -> None:
        """What `create` refuses about where it writes, checked alone so that a command can refuse before it
        loads a model or reads the corpus."""
        root = Path(root)
        if metric not in fv.METRICS:
            raise UsageError(f"--metric {metric}: expected one of {', '.join(fv.METRICS)}")
        if root.exists() and not root.is_dir():
            raise UsageError(f"{root}: exists and is not a directory")
        if root.is_dir() and not cls.exists(root) and not layout.only_leftovers(root):
            raise UsageError(f"{root}: exists, is not empty and is not a ragkit index; refusing to write into it")
        if cls.exists(root) and not overwrite:
            raise UsageError(f"{root}: an index is already there", hint="Use --overwrite, or `ragkit index add`.")

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
        (spec, metric, max_memory, max_build_time (seconds), overwrite, threads, device, sparse)."""
        if not passages:
            raise InputError(Location("<passages>"), "empty corpus: no passages to index")
        _check_unique(passages)
        check_vectors(len(passages), vectors, encoder.dim)
        with cls.create(root, encoder, **options) as build:
            build.add(passages, vectors)
        assert build.index is not None
        return build.index

    # -- changing --------------------------------------------------------------------------------
    def _change(self, edit: Callable[["Draft", ChangeReport], None], *, manifest: dict[str, Any] | None = None,
                auto_compact: bool = True) -> ChangeReport:
        """Stage a new version from this one (its segments linked over), let `edit` add to it, compact when
        the thresholds say so, and publish it.

        A change that only adds, replaces or removes passages (no manifest of its own) is rebased when
        another writer published meanwhile: `edit` reads the index it is given, so it applies as well to
        the newer version, and nothing either writer did is lost."""
        rebase = manifest is None
        manifest = dict(self.manifest if manifest is None else manifest)
        with names_full_disk(self.root, kept=KEPT), layout.writer_lock(self.root):
            if layout.current_version_dir(self.root) != self.version_dir:
                if not rebase:
                    raise ResourceError(f"{self.root}: changed by another writer since it was opened; open it again")
                self._rebase()
                manifest = dict(self.manifest)
            layout.remove_stale(self.root)
            version = layout.next_version(self.root)
            staging = layout.new_staging_dir(self.root, version)
            try:
                draft = Draft(self.root, staging, version, segments=[(s.meta, self.version_dir) for s in self.segments],
                               dead=set(self.tombstones), next_vid=int(self.manifest["next_vid"]),
                               files={n: (self.version_dir, m) for n, m in self.manifest["files"].items()
                                      if not n.startswith("sparse/")},
                               metric=self.metric, keep_exact=self.spec.refine > 0)
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

    def _rebase(self) -> None:
        """Move this handle to the version another writer published; refused when that writer changed the
        embedder (a refresh): vectors made for the old model cannot join the new one."""
        encoder = self.manifest["encoder"]
        self._reopen()
        if self.manifest["encoder"] != encoder:
            raise ResourceError(f"{self.root}: re-embedded by another writer (a refresh) since it was opened",
                                hint="run the command again: it embeds with the index's new model")

    def _ensure_template(self, draft: "Draft") -> None:
        """A format-1 index has no template: take the base's trained state, emptied."""
        if TEMPLATE in draft.files:
            return
        import faiss

        template = faiss.clone_index(self.segments[0].cpu_faiss())
        template.reset()
        faiss.write_index(template, str(draft.staging / TEMPLATE))
        draft.new_file(TEMPLATE)

    def _reopen(self) -> None:
        """Move this handle to the version just published (`latest`)."""
        self.__dict__.update(self.latest().__dict__)

    def latest(self) -> "Index":
        """The index's current version, keeping the Faiss indexes already read for the segments it shares
        with this one (segments are immutable: same name, same vectors), so that following a change costs
        the change. This handle must not be searched afterwards: the base's in-memory Faiss index is
        shared with the new handle, which may merge newer deltas into it (a server switches versions
        between requests, on the one thread that searches)."""
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
        return reopened

    def load(self) -> "Index":
        """Read every segment's Faiss index (deltas merged) and the BM25 side now, not on the first search:
        a server pays this before it serves the version, not inside a request."""
        self._searchers()
        if self.sparse_config is not None and self._sparse is None:
            self._sparse = self._open_sparse()
        return self

    def _open_sparse(self) -> SegmentedBM25 | LegacySparseSide:
        """The BM25 side: every segment's part, or (an index of the older layout) the version's bm25s folder."""
        config = self.sparse_config
        assert config is not None
        metas = [s.meta for s in self.segments if s.meta.passages]
        if all(m.sparse for m in metas):
            return SegmentedBM25([self.version_dir / str(m.sparse) for m in metas], self.dead, config)
        return LegacySparseSide(self.version_dir, config)

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
        check_vectors(len(passages), vectors, self.dim)

        def edit(draft: Draft, report: ChangeReport) -> None:
            existing = self._live_vids_for([p.id for p in passages])
            draft.add_delta(passages, vectors, deletes=list(existing.values()))
            report.replaced = len(existing)
            report.added = len(passages) - len(existing)

        return self._change(edit, manifest=manifest)

    def remove(self, ids: Sequence[str]) -> ChangeReport:
        def edit(draft: Draft, report: ChangeReport) -> None:
            found = self._live_vids_for(ids)
            report.missing = [i for i in dict.fromkeys(ids) if i not in found]
            if found:
                draft.add_delta([], np.zeros((0, self.dim), np.float32), deletes=list(found.values()))
            report.removed = len(found)

        return self._change(edit)

    def compact(self) -> ChangeReport:
        """Fold every segment into one base and drop the tombstones (a new version)."""
        def edit(draft: Draft, report: ChangeReport) -> None:
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

        def edit(draft: Draft, report: ChangeReport) -> None:
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
                meta = write_base(writer, resolved, encoder.dim, self.metric, "cpu")
            except BaseException:
                writer.abort()
                raise
            draft.replace_all(meta)
            draft.new_file(TEMPLATE)

        self._change(edit, manifest=manifest, auto_compact=False)
        return count

    def add_sparse(self, config: SparseConfig) -> None:
        """Give an existing index a BM25 side (a new version; vectors and passages unchanged)."""
        old = self.sparse_config
        retokenize = old is None or old.tokenization != config.tokenization

        def edit(draft: Draft, report: ChangeReport) -> None:
            if retokenize:  # k1 and b are applied at query time: new values alone keep every part
                draft.drop_sparse_parts()

        self._change(edit, auto_compact=False,
                     manifest={**self.manifest, "sparse": {"library": "bm25s", **config.to_json()}})

    def tune(self, *, ef_search: int | None = None, nprobe: int | None = None, refine: int | None = None) -> None:
        """Change the search settings pinned in the manifest (a new version; nothing rebuilt): every later
        open, `ragkit serve` and Ray's actors included, searches with them. They are search-time only, so an
        index built before a default changed gets the new default's results exactly."""
        spec = self.spec
        wanted = {"ef_search": ef_search, "nprobe": nprobe, "refine": refine}
        allowed = {"hnsw": {"ef_search"}, "ivf-pq": {"nprobe", "refine"}}.get(spec.kind, set())
        for name, value in wanted.items():
            if value is not None and name not in allowed:
                raise UsageError(f"{name}: {self.root} (spec {spec.text}) has no such search setting",
                                 hint="hnsw takes ef_search; ivf-pq takes nprobe and refine.")
        if refine is not None:
            self._check_refine(refine)
        if refine is not None and refine <= 0 and spec.refine:
            raise UsageError(f"refine={refine}: {self.root} keeps exact vectors; its pinned refine stays positive "
                             "(later changes keep writing them)", hint="Search with refine=0 instead.")
        params = {**spec.params, **{k: int(v) for k, v in wanted.items() if v is not None}}
        tuned = IndexSpec(spec.kind, params, spec.factory_string)
        if tuned.text == spec.text:
            return
        self._change(lambda draft, report: None, auto_compact=False, manifest={**self.manifest, "spec": tuned.text})

    # -- searching -------------------------------------------------------------------------------
    def check_encoder(self, encoder: EncoderInfo, *, queries: bool = False) -> None:
        """Refuse vectors from a model other than the one that embedded this index (`queries`: other than its
        query encoder, when it records a separate one)."""
        recorded = self.encoder  # a property: one read
        built = recorded.for_queries() if queries else recorded
        if encoder.dim != built.dim:
            raise ResourceError(
                f"embedder '{encoder.name}' gives dimension {encoder.dim}; {self.root} was built with "
                f"'{built.name}' (dimension {built.dim})",
                hint=f"Search with --model {built.name}.",
            )
        if encoder.pooling and built.pooling and encoder.pooling != built.pooling:
            raise ResourceError(
                f"embedder '{encoder.name}' pools by {encoder.pooling}; {self.root} was embedded pooling by "
                f"{built.pooling}", hint=f"Search without --pooling (the index's {built.pooling} is used), or rebuild.")
        if encoder.fingerprint != built.fingerprint or encoder.normalize != built.normalize:
            role = "query encoder of" if built is not recorded else "model that built"
            raise ResourceError(
                f"embedder '{encoder.name}' is not the {role} {self.root} ('{built.name}', "
                f"fingerprint {built.fingerprint[:12]}, normalize={built.normalize})",
                hint=f"Search with --model {built.name}, or rebuild the index with the new model.",
            )

    def _check_refine(self, refine: int) -> None:
        """Re-ranking (refine other than 0) needs the exact vectors, which only an index built with refine=R keeps."""
        if refine and not self.exact:
            raise UsageError(f"refine={refine}: {self.root} keeps no exact vectors to re-rank with",
                             hint=f"Build it with a spec such as ivf-pq:refine={AUTO_REFINE}.")

    def set_search_params(self, *, ef_search: int | None = None, nprobe: int | None = None,
                          refine: int | None = None) -> None:
        """Search settings for this handle; `refine` (candidates re-ranked from the exact vectors, 0 = off)
        needs an index built with refine=R in its spec, which keeps them."""
        if refine is not None:
            self._check_refine(refine)
            self.refine = int(refine)
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
        k = min(k, max(1, sum(segment.rows for segment in self.segments)))  # memory follows the index, not --k
        if self.refine and self.exact:
            scores, vids = self._search_codes(queries, max(k, self.refine))
            return self._plausible(queries, *self.exact.rerank(queries, vids, k, self.metric))
        return self._search_codes(queries, k, checked=True)

    def _search_codes(self, queries: np.ndarray, k: int, *, checked: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The top k by the codes' (approximate) scores; `checked`: with the corruption check of `_plausible`
        (re-ranked candidates are checked on their exact scores instead)."""
        parts = [segment.search(queries, k) for segment in self._searchers()]
        parts = [p for p in parts if p[1].shape[1]]
        if not parts:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if len(parts) == 1:
            scores, vids = parts[0]
        else:
            scores = np.concatenate([p[0] for p in parts], axis=1)
            vids = np.concatenate([p[1] for p in parts], axis=1)
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            scores, vids = np.take_along_axis(scores, order, 1), np.take_along_axis(vids, order, 1)
        return self._plausible(queries, scores, vids) if checked else (scores, vids)

    def _plausible(self, queries: np.ndarray, scores: np.ndarray, vids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Refuse scores no stored vector can give: a bit flip in a large vectors file (only sizes are checked
        on open above 16 MiB) otherwise serves cosine scores of 100 (seen). With unit-length passages,
        |q.x| <= |q| and |q - x|^2 <= (|q| + 1)^2; PQ/SQ codes approximate, hence the 1.5x slack."""
        live = vids >= 0
        if not live.any():
            return scores, vids
        bad = live & ~np.isfinite(scores)
        if self.encoder.normalize:
            norms = np.linalg.norm(queries, axis=1, keepdims=True)
            bound = 1.5 * norms + 1e-3 if self.metric == "ip" else 1.5 * (norms + 1.0) ** 2 + 1e-3
            bad |= live & (np.abs(scores) > bound)
        if bad.any():
            q, j = map(int, np.argwhere(bad)[0])
            raise ResourceError(f"{self.root}: impossible score {scores[q, j]:.4g} for a stored vector (vid "
                                f"{int(vids[q, j])}): a vectors file is corrupted",
                                hint="Find it with `ragkit index info DIR --verify`; restore it or rebuild.")
        return scores, vids

    def _searchers(self) -> list[Segment]:
        """The segments a search runs on. IVF deltas share the base's coarse quantiser (they are clones of
        its template), so their lists are merged into the loaded base in memory (`merge_from`, O(delta);
        the files are untouched): one search, one coarse quantisation of the queries, instead of one per
        delta. HNSW deltas up to 5% of the base are inserted into the loaded graph (once per open, about
        the cost of adding them to an HNSW index); flat deltas are searched on their own."""
        if self._searcher_cache is None:
            self._searcher_cache = self._merge_deltas_into_base()
        return self._searcher_cache

    def _merge_deltas_into_base(self) -> list[Segment]:
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
        return fetch_rows(self._vid_starts, self._by_start, vids, ids_only=ids_only)

    def _hits(self, scores: np.ndarray, vids: np.ndarray) -> list[HitRow]:
        valid = (vids >= 0).sum(axis=1).tolist()  # the -1 padding is always at the end of a row
        lookup = PassageLookup(self._vid_starts, self._by_start, vids[vids >= 0])
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
            self._sparse = self._open_sparse()
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
        if self.exact and self.exact.covers(vids):
            return self.exact.rows(vids)
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
            **({"query_embedder": m["encoder"]["query"]["name"]} if m["encoder"].get("query") else {}),
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
            source: str | None = None, origin: tuple[Path, int] | None = None) -> None:
        """Store a block; `lines` (and the file they are in, `source`) name a duplicate id's line; `origin`
        (a .npy file, first row): `vectors` are those rows of it (see `SegmentWriter.add`)."""
        if source is not None:
            self._writer.source = source
        self._writer.add(passages, vectors, lines=lines, origin=origin)

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
