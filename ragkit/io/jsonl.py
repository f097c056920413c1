"""JSON Lines in and out, with file:line in every error."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from ragkit.errors import InputError, Location, ResourceError


_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_UTF8_BOM = b"\xef\xbb\xbf"
_CONVERT = "convert it to UTF-8 (e.g. iconv -f LATIN1 -t UTF-8 FILE > FILE.utf8)"


def _decode_line(raw: bytes, name: str, lineno: int) -> str:
    """One line of UTF-8 (a BOM on line 1 dropped); anything else is an InputError at that file and line."""
    if lineno == 1:
        if raw.startswith(_UTF16_BOMS):
            raise InputError(Location(name, 1), "the file is UTF-16, expected UTF-8",
                             hint="convert it: iconv -f UTF-16 -t UTF-8 FILE > FILE.utf8")
        raw = raw.removeprefix(_UTF8_BOM)
    if b"\0" in raw:
        column = raw.index(b"\0") + 1
        raise InputError(Location(name, lineno), f"NUL byte at column {column}: a binary file, "
                                                 "or UTF-16 text without its byte-order mark?", hint=_CONVERT)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(Location(name, lineno), f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                                 f"{exc.start + 1})", hint=_CONVERT) from None


class Utf8Lines:
    """A text file read as checked UTF-8 lines: iterate it (csv.reader can), close it.

    Python's text mode raises a bare UnicodeDecodeError with a byte offset and no line, from deep inside
    whatever reads the file (a tokenizer, for stdin); decoding line by line here names the file and line."""

    def __init__(self, raw: IO[bytes], name: str, *, owned: bool) -> None:
        self.raw, self.name, self.owned = raw, name, owned

    def __iter__(self) -> Iterator[str]:
        for lineno, line in enumerate(self.raw, start=1):
            yield _decode_line(line, self.name, lineno)

    def close(self) -> None:
        if self.owned:
            self.raw.close()

    def __enter__(self) -> Utf8Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _existing_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise ResourceError(f"{p}: no such file", hint="Check the path.")
    if p.is_dir():
        raise ResourceError(f"{p}: is a directory, expected a file")
    return p


def open_text(path: str | Path) -> Utf8Lines:
    """A text file, or stdin for '-', as checked UTF-8 lines."""
    if str(path) == "-":
        return Utf8Lines(sys.stdin.buffer, "<stdin>", owned=False)
    return Utf8Lines(open(_existing_file(path), "rb"), str(path), owned=True)


def read_text(path: str | Path) -> str:
    """A whole text file (JSON, YAML, plain lines) as checked UTF-8: an error names the file and line."""
    p = _existing_file(path)
    raw = p.read_bytes()
    if b"\0" not in raw:  # NUL is valid UTF-8 but never text: it takes the line-by-line path below
        with contextlib.suppress(UnicodeDecodeError):
            return raw.removeprefix(_UTF8_BOM).decode("utf-8")
    # only a file that is not clean UTF-8 is decoded line by line, for the error to name its line
    return "\n".join(_decode_line(line, str(p), lineno) for lineno, line in enumerate(raw.split(b"\n"), start=1))


def display_name(path: str | Path) -> str:
    return "<stdin>" if str(path) == "-" else str(path)


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; a line that is not a JSON object is an error."""
    name = display_name(path)
    for lineno, record in iter_records(path):
        if isinstance(record, str):
            raise InputError(Location(name, lineno), "expected a JSON object on this line")
        yield lineno, record


def is_int(value: Any) -> bool:
    """An integer, and not a bool: JSON's `true` decodes to Python's True, which is an int."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float, and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _NotJson(ValueError):
    pass


def _refuse_constant(name: str) -> None:
    """NaN / Infinity are accepted by Python's json but by no other JSON reader: refused, so they are never
    stored and written back out as bare NaN."""
    raise _NotJson(name)


class _Overflow(ValueError):
    pass


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400
        raise _Overflow(text)
    return value


def first_path(value: Any, hit: Callable[[Any], bool], path: str = "") -> str | None:
    """The field path (`meta.tags[1]`, under `path`) of the first value in `value`, in document order, for
    which `hit` is true; a dict key that hits is reported as its dict's path ("key" at the top). None when
    nothing hits. Iterative: a decoded body may be nested as deep as the JSON parser goes."""
    stack: list[tuple[Any, str, bool]] = [(value, path, False)]
    while stack:
        item, where, is_key = stack.pop()
        if hit(item):
            return (where or "key") if is_key else where
        if isinstance(item, dict):
            entries = []
            for key, child in item.items():
                entries += [(key, where, True), (child, f"{where}.{key}" if where else str(key), False)]
            stack.extend(reversed(entries))
        elif isinstance(item, list):
            stack.extend(reversed([(child, f"{where}[{i}]", False) for i, child in enumerate(item)]))
    return None


def _lone_surrogate(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def lone_surrogate_at(value: Any, path: str = "") -> str | None:
    """The field path of the first string in `value` that holds a lone surrogate (`"\\ud800"`: valid JSON, but
    no UTF-8 text, so SQLite, a tokenizer and every writer would fail on it later); None when there is none.
    A key that holds one is reported as its parent (or "key" at the top)."""
    return first_path(value, _lone_surrogate, path)


def iter_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """Non-blank lines as (line number, JSON object) when they start with '{', else (line number, text).

    Queries, questions and id lists accept both, so a plain `echo "question" | ragkit ...` works.
    """
    name = display_name(path)
    with open_text(path) as handle:
        for lineno, line in enumerate(handle, start=1):
            text = line.strip()
            if not text:
                continue
            if not text.startswith("{"):
                yield lineno, text
                continue
            try:
                obj = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
            except json.JSONDecodeError as exc:
                raise InputError(Location(name, lineno), f"malformed JSON ({exc.msg} at column {exc.colno})") from None
            except _NotJson as exc:
                raise InputError(Location(name, lineno), f"{exc} is not JSON (Python writes it for a float NaN "
                                                         "or infinity); use null") from None
            except _Overflow as exc:
                raise InputError(Location(name, lineno), f"{exc} is beyond a float64's range (it would be "
                                                         "written back as Infinity)") from None
            except RecursionError:
                raise InputError(Location(name, lineno), "JSON nested too deeply to read") from None
            if "\\ud" in text or "\\uD" in text:  # only \u escapes can make a lone surrogate
                field = lone_surrogate_at(obj)
                if field is not None:
                    raise InputError(Location(name, lineno, field or "text"),
                                     "holds a lone surrogate (\\ud800-\\udfff), which is not text")
            yield lineno, obj


def write_jsonl_line(obj: dict[str, Any], out: IO[str] | None = None) -> None:
    out = out or sys.stdout
    out.write(json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n")


def dump_jsonl(rows: Iterable[dict[str, Any]], out: IO[str]) -> None:
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")


_END = object()


def batches_as_ready(items: Iterable[Any], size: int, wait_s: float = 0.05) -> Iterator[list[Any]]:
    """Blocks of up to `size` items, a short block as soon as the input pauses for `wait_s`.

    Batching makes a file of queries fast; waiting for a full block made an interactive
    `echo q | ragkit index search` (or a slow producer upstream in a pipe) answer nothing until 256 lines or
    the end. A reader thread feeds a bounded queue (memory stays at a few blocks), and errors it meets
    (a bad line) are raised here, in order, after the items before them."""
    import queue
    import threading

    pending: queue.Queue[Any] = queue.Queue(maxsize=4 * size)

    def read() -> None:
        try:
            for item in items:
                pending.put(item)
        except BaseException as exc:  # handed to the consumer, which raises it
            pending.put(exc)
        pending.put(_END)

    threading.Thread(target=read, name="ragkit-reader", daemon=True).start()
    block: list[Any] = []
    while True:
        try:
            item = pending.get(timeout=wait_s) if block else pending.get()
        except queue.Empty:
            yield block
            block = []
            continue
        if item is _END:
            break
        if isinstance(item, BaseException):
            if block:
                yield block
            raise item
        block.append(item)
        if len(block) >= size:
            yield block
            block = []
    if block:
        yield block
