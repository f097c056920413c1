"""The on-disk layout of an index directory, and its crash-safe publication.

    DIR/
      current -> v000003          symlink to the live version, switched atomically
      v000003/
        manifest.json             what is inside: embedder, metric, spec, segments, counts, checksums
        template.faiss            the trained empty index deltas start from
        seg-NNNNNN.faiss/.sqlite  a segment's vectors (faiss.read_index opens them) and passages
        seg-NNNNNN.deletes.npy    the vids a change removed
        sparse/                   optional BM25 side (bm25s files + vids.npy)
      .lock                       held by the one writer

Each version folder holds the files of its segments (`ragkit.index.segments`), most of them hard links to
the previous version's. A writer fills a staging folder, fsyncs it, renames it to the next version and only then repoints
`current`. A process killed at any moment leaves `current` on the previous complete version; the
next writer removes what the dead one left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from ragkit.io.atomic import fsync_dir, fsync_file

CURRENT = "current"
MANIFEST = "manifest.json"
VECTORS = "vectors.faiss"
PASSAGES = "passages.sqlite"
LOCK = ".lock"
_VERSION_RE = re.compile(r"^v(\d{6})$")


def current_version_dir(root: Path) -> Path | None:
    link = root / CURRENT
    if not link.is_symlink() and not link.is_dir():
        return None
    target = root / os.readlink(link) if link.is_symlink() else link
    if link.is_symlink() and (not _VERSION_RE.match(target.name) or target.resolve().parent != root.resolve()):
        from ragkit.errors import ResourceError

        raise ResourceError(f"{link}: points at '{os.readlink(link)}', not a version folder inside {root}")
    return target if (target / MANIFEST).exists() else None


def inside(folder: Path, name: str) -> Path:
    """`folder / name` for a name the manifest gives, refused unless it stays inside `folder`."""
    from ragkit.errors import ResourceError

    path = folder / name
    if not name or Path(name).is_absolute() or ".." in Path(name).parts or not path.resolve().is_relative_to(folder.resolve()):
        raise ResourceError(f"{folder / MANIFEST}: names '{name}', which is not a file inside {folder}")
    return path


def next_version(root: Path) -> int:
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := _VERSION_RE.match(p.name))]
    return max(numbers, default=0) + 1


def new_staging_dir(root: Path, version: int) -> Path:
    staging = root / f".staging-v{version:06d}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish(root: Path, staging: Path, version: int) -> Path:
    """Make a fully written staging folder the live version, atomically."""
    for item in sorted(staging.rglob("*"), key=lambda p: -len(p.parts)):  # files, then their folders
        if item.is_dir():
            fsync_dir(item)
        else:
            fsync_file(item)
    fsync_dir(staging)
    final = root / f"v{version:06d}"
    os.rename(staging, final)
    fsync_dir(root)
    tmp_link = root / f".current-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp_link.unlink()
    os.symlink(final.name, tmp_link)
    os.replace(tmp_link, root / CURRENT)
    fsync_dir(root)
    remove_stale(root)
    return final


def only_leftovers(root: Path) -> bool:
    """Whether `root` holds nothing but what killed ragkit writers leave (the lock, staging folders, a
    version folder never made current): such a folder is an empty index folder, not someone's data."""
    if (root / CURRENT).exists() or (root / CURRENT).is_symlink():
        return False
    return all(item.name == LOCK or _VERSION_RE.match(item.name) or item.name.startswith((".staging-", ".current-"))
               for item in root.iterdir())


def remove_stale(root: Path) -> None:
    """Delete every version and staging folder except the live one."""
    live = current_version_dir(root)
    for item in root.iterdir():
        if item.name in (CURRENT, LOCK) or (live is not None and item.resolve() == live.resolve()):
            continue
        if _VERSION_RE.match(item.name) or item.name.startswith((".staging-", ".current-")):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    item.unlink()


@contextlib.contextmanager
def writer_lock(root: Path) -> Iterator[None]:
    """One writer at a time per index directory (readers never lock). The lock file is opened without
    following a symlink and without truncation: a crafted `.lock` cannot make a writer touch another file."""
    import stat

    from ragkit.errors import ResourceError

    root.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        raise ResourceError(f"{root / LOCK}: cannot be used as the writer lock ({exc.strerror}; a symlink?)") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ResourceError(f"{root / LOCK}: the writer lock is not a regular file")
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
