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


def _open_lock(root: Path, flags: int) -> int:
    """The lock file, opened without following a symlink; refused when it is not a regular file."""
    import stat

    from ragkit.errors import ResourceError

    try:
        fd = os.open(root / LOCK, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        raise ResourceError(f"{root / LOCK}: cannot be used as the writer lock ({exc.strerror}; a symlink?)") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ResourceError(f"{root / LOCK}: the writer lock is not a regular file")
    return fd


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).decode().strip() or 0)
        if pid:
            return f" (pid {pid})"
    return ""


def busy_writer(root: Path) -> str | None:
    """None when no writer holds `root`'s lock, else who does ("pid N" when known). Commands ask this
    before the expensive part (embedding), so that a second writer fails or queues before doing work."""
    if not (root / LOCK).is_file() or (root / LOCK).is_symlink():
        return None
    fd = _open_lock(root, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return f"another ragkit process{_holder(fd)}"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def refuse_if_busy(root: Path, wait: bool) -> None:
    """Exit 4 at once when another writer holds the index, unless `wait` (then the write queues)."""
    from ragkit.console import info
    from ragkit.errors import ResourceError

    who = busy_writer(root) if root.is_dir() else None
    if who is None:
        return
    if not wait:
        raise ResourceError(f"{root}: {who} is changing this index", hint="rerun with --wait to queue behind it")
    info(f"{root}: {who} is changing this index; waiting for it (--wait)")


@contextlib.contextmanager
def writer_lock(root: Path) -> Iterator[None]:
    """One writer at a time per index directory (readers never lock); a second writer waits here. The lock
    file is opened without following a symlink and without truncation: a crafted `.lock` cannot make a
    writer touch another file. The holder's pid is written into it for the messages of other writers."""
    root.mkdir(parents=True, exist_ok=True)
    fd = _open_lock(root, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
