"""Memory-mapped arrays that stream through a process without staying resident in it."""

from __future__ import annotations

import mmap

import numpy as np


def drop_pages(array: np.ndarray) -> None:
    """Drop a memory-mapped array's pages from this process (clean pages stay in the page cache, to be
    read back on demand): a stream over a file larger than RAM then holds one block, not the file.
    Flush a writable map first; anything that is not a mapping is left alone."""
    advise(array, "MADV_DONTNEED")


def advise(array: np.ndarray, advice: str) -> None:
    """madvise a memory-mapped array's whole mapping (`advice` names an mmap.MADV_* constant); anything that
    is not a mapping, or an advice this platform lacks, is left alone."""
    handle = getattr(array, "_mmap", None)
    if isinstance(handle, mmap.mmap) and hasattr(mmap, advice):
        handle.madvise(getattr(mmap, advice))
