"""Released passage embeddings (Contriever / DPR `wikipedia_embeddings/passages_XX`), read safely.

Each file is a pickle of `(ids, embeddings)`: a list of passage ids and a float32 array (n, d), as the
seeds' `generate_passage_embeddings.py` writes it. Pickle can run arbitrary code, so these files are read
with an unpickler that resolves only the NumPy names an array needs (`_reconstruct`, `ndarray`, `dtype`,
`scalar`, `_frombuffer`, and `_codecs.encode` for protocol-2 bytes) and refuses every other global: a crafted file is an input error naming it, and
nothing in it runs. The ids are matched to a passage file (psgs_w100.tsv) by `ragkit index build`.
"""

from __future__ import annotations

import io
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ragkit.errors import InputError, Location, ResourceError
from ragkit.index.builder import finite_rows

RELEASED_RE = re.compile(r"^(?:passages_(\d+)|wikipedia_passages_(\d+)\.pkl)$")  # Contriever, DPR
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric",
                  "numpy")
_ALLOWED = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module in _NUMPY_MODULES and name in _ALLOWED) or (module, name) == ("_codecs", "encode"):
            return super().find_class(module, name)  # _codecs.encode: how protocol 2 spells bytes
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def released_files(directory: Path) -> list[Path]:
    """The `passages_XX` files of a folder, in numeric order (empty when it holds none)."""
    if not directory.is_dir():
        return []
    found = [(m, p) for p in directory.iterdir() if p.is_file() and (m := RELEASED_RE.match(p.name))]
    return [p for m, p in sorted(found, key=lambda mp: int(mp[0].group(1) or mp[0].group(2)))]


def read_released(path: Path) -> tuple[list[str], np.ndarray]:
    """(ids, float32 embeddings) of one released file; anything else in it is refused (exit 3)."""
    try:
        with open(path, "rb") as handle:
            obj = _ArraysOnly(io.BufferedReader(handle)).load()  # type: ignore[arg-type]
    except OSError as exc:
        raise ResourceError(f"{path}: cannot be read ({exc.strerror})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError) as exc:
        raise InputError(Location(str(path)), f"not a released embedding file ({exc})") from None
    if isinstance(obj, list) and all(isinstance(r, tuple) and len(r) == 2 for r in obj):
        # DPR's generate_dense_embeddings.py: a list of (id, vector) pairs
        if not all(isinstance(v, np.ndarray) and v.ndim == 1 for _, v in obj):
            raise InputError(Location(str(path), None, "embeddings"), "expected (id, 1-d float array) pairs")
        obj = ([i for i, _ in obj], np.stack([v for _, v in obj]) if obj else np.zeros((0, 0), np.float32))
    if not (isinstance(obj, tuple) and len(obj) == 2):
        raise InputError(Location(str(path)), "expected a pickled (ids, embeddings) pair or (id, vector) pairs")
    ids, vectors = obj
    if isinstance(ids, np.ndarray) and ids.dtype.kind in "iuU":
        ids = ids.tolist()
    if not isinstance(ids, list) or not all(isinstance(i, (str, int)) and not isinstance(i, bool) for i in ids):
        raise InputError(Location(str(path), None, "ids"), "expected a list of string or integer ids")
    if not isinstance(vectors, np.ndarray) or vectors.ndim != 2 or vectors.dtype.kind != "f":
        raise InputError(Location(str(path), None, "embeddings"), "expected a 2-d float array")
    if len(ids) != len(vectors):
        raise InputError(Location(str(path)), f"{len(ids)} ids for {len(vectors)} embeddings")
    finite_rows(vectors, path, 0)  # non-finite vectors built, then every search found nothing (and --verify passed)
    return [_plain_id(str(i)) for i in ids], vectors


def _plain_id(pid: str) -> str:
    """DPR writes passage ids as 'wiki:123' where psgs_w100.tsv says '123'."""
    return pid[5:] if pid.startswith("wiki:") else pid


def iter_released(directory: Path) -> Iterator[tuple[Path, list[str], np.ndarray]]:
    """Every released file of a folder in order, checked for one dimension."""
    dim = None
    for path in released_files(directory):
        ids, vectors = read_released(path)
        if dim is None:
            dim = vectors.shape[1]
        elif vectors.shape[1] != dim:
            raise InputError(Location(str(path)), f"embeddings of dimension {vectors.shape[1]}, the earlier files' are {dim}")
        yield path, ids, vectors
        del ids, vectors  # before the next file is read: one file in memory at a time, not two


def import_released(build: Any, corpus: str | Path, directory: Path, *, block: int = 10_000) -> int:
    """Fill a build from a passage file and released embeddings matched to it by id: the passages are
    stored first (streamed), then each embedding file's vectors are added under their passages' vids.
    An id with no passage, a passage with no vector, or a repeated vector is an input error."""
    from ragkit.io.corpus import iter_passages_with_lines
    from ragkit.io.jsonl import display_name

    files = released_files(directory)
    if not files:
        raise ResourceError(f"{directory}: no released embedding files (passages_XX or wikipedia_passages_N.pkl)")
    passages, lines = [], []
    for lineno, passage in iter_passages_with_lines(corpus):
        passages.append(passage)
        lines.append(lineno)
        if len(passages) == block:
            build.add_passages(passages, lines=lines, source=display_name(corpus))
            passages, lines = [], []
    if passages:
        build.add_passages(passages, lines=lines, source=display_name(corpus))
    store = build.store
    vectors_added = 0
    for path, ids, vectors in iter_released(directory):
        if vectors.shape[1] != build.dim:
            raise InputError(Location(str(path)), f"embeddings of dimension {vectors.shape[1]}; --model gives {build.dim}")
        for start in range(0, len(ids), block):
            chunk = ids[start : start + block]
            found = store.vids_for(chunk)
            missing = [i for i in chunk if i not in found]
            if missing:
                raise InputError(Location(str(path), None, "ids"),
                                 f"id '{missing[0]}' (and {len(missing) - 1} more) not in {display_name(corpus)}")
            if len(set(chunk)) != len(chunk):
                raise InputError(Location(str(path), None, "ids"), "an id appears twice")
            build.add_vectors(vectors[start : start + block], [found[i] for i in chunk])
            vectors_added += len(chunk)
        del ids, vectors  # this file's arrays go before the generator reads the next
    if vectors_added != build.rows:
        raise InputError(Location(display_name(corpus)),
                         f"{build.rows} passages but {vectors_added} embeddings in {directory}: every passage needs one")
    return vectors_added
