"""Staging a new index version: the segments it keeps (hard links), the delta or merged segment it adds,
its tombstones, compaction, the BM25 side, the manifest and the atomic publication."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ragkit.index import layout
from ragkit.index import vectors as fv
from ragkit.index.builder import SegmentWriter
from ragkit.index.segments import TEMPLATE, Segment, SegmentMeta, link_into, merge_segments, segment_name
from ragkit.index.sparse import SparseConfig, part_name, write_part
from ragkit.index.spec import IndexSpec
from ragkit.index.store import PassageStore, copy_live_rows
from ragkit.io.atomic import sha256_file
from ragkit.io.corpus import Passage

FORMAT_VERSION = 3  # the newest format this ragkit reads and writes
COMPACT_TOMBSTONE_FRACTION = 0.2  # fold everything back once a fifth of the vectors are dead
MAX_DELTAS = 8  # fold the deltas into one past this many (the base is left alone)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_base(writer: SegmentWriter, spec: IndexSpec, dim: int, metric: str, device: str) -> SegmentMeta:
    """Train a new Faiss index of `spec` on the writer's vectors, save its empty trained state as the
    template for later deltas, and fill it."""
    import faiss

    began = time.perf_counter()
    faiss_index = fv.new_index(spec, dim, writer.rows, metric)
    target = fv.to_device(faiss_index, device)[0] if device != "cpu" else faiss_index
    if not target.is_trained:
        from ragkit.index.builder import RowSource
        from ragkit.io.mapped import drop_pages

        blocks = writer.blocks()
        fv.train_if_needed(target, RowSource(blocks, dim))
        for block in blocks:
            drop_pages(block)
    faiss.write_index(fv.to_cpu(target), str(writer.staging / TEMPLATE))
    writer.phase_seconds["train"] = time.perf_counter() - began
    return writer.finish(target, keep_exact=spec.refine > 0)


class Draft:
    """A version being staged: its segments (each with the folder its files are in now), dead vids and
    files. Files taken over from the previous version keep their recorded checksums (never recomputed
    from what is on disk, so a corrupted file cannot be laundered into a fresh manifest)."""

    def __init__(self, root: Path, staging: Path, version: int, *, segments: list[Any], dead: set[int],
                 next_vid: int, files: dict[str, tuple[Path, dict[str, Any]]], metric: str = "ip",
                 keep_exact: bool = False) -> None:
        self.root, self.staging, self.version = root, staging, version
        self.keep_exact = keep_exact  # new segments keep their vectors on disk for re-ranking (spec refine=R)
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
            if name not in self.files:  # a compaction's merged segment keeps its parts' exact vectors files
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
                meta = writer.finish(fv.delta_index(faiss.read_index(str(template_dir / TEMPLATE))),
                                     keep_exact=self.keep_exact, share_quantizer=True)
            except BaseException:
                writer.abort()
                raise
            self.next_vid = writer.next_vid
        if len(deletes):
            np.save(self.staging / f"{name}.deletes.npy", np.asarray(sorted(deletes), dtype=np.int64))
            meta = dataclasses.replace(meta, deletes=f"{name}.deletes.npy")
            self.dead.update(int(v) for v in deletes)
        if meta.files:
            self.new_segment(meta)

    def replace_all(self, meta: SegmentMeta) -> None:
        """A new base replaces every segment (refresh)."""
        self._drop_segments(len(self.segments))
        self.dead = set()
        self.new_segment(meta)

    def _drop_segments(self, count: int) -> None:
        """Forget the last `count` segments and their files."""
        dropped, self.segments = self.segments[len(self.segments) - count :], self.segments[: len(self.segments) - count]
        for meta, _ in dropped:
            for name in meta.files:
                self.files.pop(name, None)

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
        template = faiss.read_index(str(self.files[TEMPLATE][0] / TEMPLATE))
        open_segments = [Segment(folder, meta, self.metric, lambda: template) for meta, folder in merging]
        inside = {v for v in self.dead if any(m.rows and m.vid_min <= v <= m.vid_max for m, _ in merging)}
        in_merged = np.asarray(sorted(inside), dtype=np.int64)
        still_dead = sorted(self.dead - inside)
        name = self.next_name()
        try:
            merged = merge_segments(open_segments, in_merged, template)
            store = PassageStore(self.staging / f"{name}.sqlite", bulk=True)
            rows = copy_live_rows(store, [folder / m.passages for m, folder in merging if m.passages], in_merged)
            lo_hi = store.conn.execute("SELECT MIN(vid), MAX(vid) FROM passages").fetchone()
            store.close()
        finally:
            for segment in open_segments:
                segment.close()
        exact = tuple(part for meta, _ in merging for part in meta.exact)
        exact_files = {part.file: self.files[part.file] for part in exact}
        self._drop_segments(count)
        self.files.update(exact_files)  # the merged segment reads its vectors' exact values where they were
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
        self.segments = [(dataclasses.replace(m, deletes=None), f) for m, f in kept]
        self.dead = set(still_dead)
        if rows or still_dead:
            self.new_segment(SegmentMeta(name, rows, lo_hi[0] if rows else None, lo_hi[1] if rows else None, **files,
                                         exact=exact if rows else ()))

    def drop_sparse_parts(self) -> None:
        """Forget every segment's BM25 part, so that publish writes them again (new tokenisation)."""
        for i, (meta, folder) in enumerate(self.segments):
            if meta.sparse:
                self.files.pop(meta.sparse, None)
                self.segments[i] = (dataclasses.replace(meta, sparse=None), folder)

    def _write_sparse_parts(self, config: SparseConfig) -> None:
        """A BM25 part for each segment with passages that has none yet (the new ones: a delta, a merged or
        refreshed segment; all of them when the side is new): the old parts are linked over untouched."""
        for i, (meta, folder) in enumerate(self.segments):
            if meta.sparse or not meta.passages:
                continue
            store = PassageStore(folder / meta.passages, readonly=True)
            try:
                docs = ((vid, f"{p.title} {p.text}".strip()) for vid, p in store.iter_passages())
                write_part(self.staging / part_name(meta.name), docs, config)
            finally:
                store.close()
            self.segments[i] = (dataclasses.replace(meta, sparse=part_name(meta.name)), folder)
            self.new_file(part_name(meta.name))

    def publish(self, manifest: dict[str, Any]) -> Path:
        """Write the new segments' BM25 parts, link the files taken over, write the manifest, publish."""
        manifest = {k: v for k, v in manifest.items() if k not in ("legacy_dead", "removes_in_place")}
        if manifest.get("sparse"):
            self._write_sparse_parts(SparseConfig.from_json(manifest["sparse"]))
        for name, (folder, _) in self.files.items():
            if folder != self.staging:
                link_into(folder, [name], self.staging)
        segments = [meta for meta, _ in self.segments]
        # 3 only where a delta shares the template's quantiser: an older ragkit would search it with none
        manifest["format_version"] = FORMAT_VERSION if any(m.shares_quantizer for m in segments) else 2
        manifest["updated_at"] = utc_now()
        manifest["version"] = self.version
        manifest["segments"] = [m.to_json() for m in segments]
        manifest["next_vid"] = self.next_vid
        total = sum(m.rows for m in segments)
        manifest["counts"] = {"passages": total - len(self.dead), "vectors": total, "tombstones": len(self.dead)}
        recorded = {name: meta for name, (folder, meta) in self.files.items() if meta}
        names = sorted(self.files)
        manifest["files"] = {
            name: recorded.get(name) or {"bytes": (self.staging / name).stat().st_size,
                                         "sha256": sha256_file(self.staging / name)}
            for name in names
        }
        (self.staging / layout.MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        return layout.publish(self.root, self.staging, self.version)
