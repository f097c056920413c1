"""What an index's manifest must get right before anything is read or written through it (issue 27.12).

The manifest is the root of trust: file sizes and checksums are checked against it, but nothing checked the
manifest itself. A segment pointing at another segment's vectors opened with duplicate hits and unreachable
passages; `next_vid: NaN` opened and the next writer failed; a dimension edited from 384 to 768 was refused
by search but built on by `remove`. These checks are cheap (the manifest, and the first 16 bytes of each
Faiss file: its type, dimension and vector count), so they run on every open, and a writer, which always
starts from an opened index, never builds on a manifest that fails them.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from ragkit.errors import ResourceError
from ragkit.io.jsonl import is_int

HINT = "Restore the index folder from a copy, or rebuild it."


def faiss_header(path: Path) -> tuple[bytes, int, int]:
    """(type code, dimension, vectors) from a Faiss file's header: every index type starts with its four-
    character code, then d (int32) and ntotal (int64)."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if len(head) < 16:
        raise ResourceError(f"{path}: not a Faiss index (truncated header)", hint=HINT)
    return head[:4], struct.unpack("<i", head[4:8])[0], struct.unpack("<q", head[8:16])[0]


def check_manifest(manifest: dict[str, Any], version_dir: Path, manifest_path: Path) -> None:
    """Refuse (exit 4, naming the manifest and the field) a manifest that cannot describe a real index."""
    def bad(field: str, why: str) -> ResourceError:
        return ResourceError(f"{manifest_path}: field '{field}': {why}", hint=HINT)

    encoder = manifest.get("encoder")
    if not isinstance(encoder, dict) or not is_int(encoder.get("dim")) or encoder["dim"] < 1:
        raise bad("encoder.dim", "expected a positive integer")
    dim = encoder["dim"]
    next_vid = manifest.get("next_vid")
    if not is_int(next_vid) or next_vid < 1:
        raise bad("next_vid", f"expected a positive integer, not {next_vid!r}")
    segments = manifest.get("segments")
    if not isinstance(segments, list):
        raise bad("segments", "expected a list of segments")
    owners: dict[str, str] = {}
    ranges = []
    for i, segment in enumerate(segments):
        where = f"segments[{i}]"
        if not isinstance(segment, dict) or not isinstance(segment.get("name"), str):
            raise bad(where, "expected a segment record with a name")
        rows = segment.get("rows")
        if not is_int(rows) or rows < 0:
            raise bad(f"{where}.rows", f"expected a count, not {rows!r}")
        low, high = segment.get("vid_min"), segment.get("vid_max")
        if rows:
            if not (is_int(low) and is_int(high) and 1 <= low <= high < next_vid):
                raise bad(f"{where}.vid_min", f"vids {low!r}..{high!r} are not within 1..{next_vid - 1}")
            if high - low + 1 < rows:
                raise bad(f"{where}.rows", f"{rows} rows cannot have vids {low}..{high}")
            ranges.append((low, high, where))
        for key in ("vectors", "passages"):
            name = segment.get(key)
            if name is None:
                continue
            if name in owners:
                raise bad(f"{where}.{key}", f"'{name}' is also {owners[name]}'s")
            owners[name] = where
        vectors = segment.get("vectors")
        if vectors and (version_dir / vectors).is_file():
            _, d, ntotal = faiss_header(version_dir / vectors)
            if d != dim:
                raise bad("encoder.dim", f"{dim}, but {vectors} holds vectors of dimension {d}")
            if ntotal != rows:
                raise bad(f"{where}.rows", f"{rows}, but {vectors} holds {ntotal} vectors")
    ranges.sort()
    for (_, high, first), (low, _, second) in zip(ranges, ranges[1:]):
        if low <= high:
            raise bad(f"{second}.vid_min", f"its vids overlap {first}'s")
