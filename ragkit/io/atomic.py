"""Crash-safe writes: write a temporary file beside the target, fsync, rename over it."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ragkit.errors import DiskFullError

# what a full disk looks like from the libraries that write for ragkit: the OS (ENOSPC, EDQUOT), SQLite
# (SQLITE_FULL), Faiss and torch.save (C++ writers that report a failed fwrite with the OS's text)
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXTS = ("No space left on device", "database or disk is full", "Disk quota exceeded")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temp file next to `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what it was raised from) is a write that found no space."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS:
            return True
        if any(text in str(seen) for text in _FULL_TEXTS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def names_full_disk(folder: str | Path, *, kept: str = "nothing was published") -> Iterator[None]:
    """A full disk inside the block becomes one DiskFullError naming `folder` (exit 4 on the command line);
    `kept` says what the writer left (its own cleanup runs before this, in the block)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise disk_full(folder, kept) from None


def disk_full(folder: str | Path, kept: str, *, writing: str | None = None,
              hint: str = "Free space there (or write elsewhere) and run the command again.") -> DiskFullError:
    """The one wording of a full disk: the folder, what was being written, what the writer kept."""
    return DiskFullError(f"{folder}: no space left on its device{f' for {writing}' if writing else ''}; {kept}",
                         hint=hint)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_open(path) as handle:
        json.dump(obj, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


# Files up to this size are checksummed every time they are read back (an index's deltas, deletes and
# template on open; a training checkpoint's states on resume); larger ones by size, and by `--verify`.
HASH_ON_READ_BYTES = 16 * 2**20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """A temporary folder beside `target`, renamed to it when the block succeeds (removed when it fails), so
    a reader sees the complete folder or none. A folder another process published first is kept."""
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # published meanwhile by another process
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
