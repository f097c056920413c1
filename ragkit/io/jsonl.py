"""JSON Lines in and out, with file:line in every error."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from ragkit.errors import InputError, Location, ResourceError


def open_text(path: str | Path) -> IO[str]:
    """Open a text file, or stdin for '-'."""
    if str(path) == "-":
        return sys.stdin
    p = Path(path)
    if not p.exists():
        raise ResourceError(f"{p}: no such file", hint="Check the path.")
    if p.is_dir():
        raise ResourceError(f"{p}: is a directory, expected a file")
    return open(p, encoding="utf-8")


def display_name(path: str | Path) -> str:
    return "<stdin>" if str(path) == "-" else str(path)


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; a line that is not a JSON object is an error."""
    name = display_name(path)
    for lineno, record in iter_records(path):
        if isinstance(record, str):
            raise InputError(Location(name, lineno), "expected a JSON object on this line")
        yield lineno, record


def iter_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """Non-blank lines as (line number, JSON object) when they start with '{', else (line number, text).

    Queries, questions and id lists accept both, so a plain `echo "question" | ragkit ...` works.
    """
    name = display_name(path)
    handle = open_text(path)
    try:
        for lineno, line in enumerate(handle, start=1):
            text = line.strip()
            if not text:
                continue
            if not text.startswith("{"):
                yield lineno, text
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InputError(Location(name, lineno), f"malformed JSON ({exc.msg} at column {exc.colno})") from None
            yield lineno, obj
    finally:
        if handle is not sys.stdin:
            handle.close()


def write_jsonl_line(obj: dict[str, Any], out: IO[str] | None = None) -> None:
    out = out or sys.stdout
    out.write(json.dumps(obj, ensure_ascii=False) + "\n")


def dump_jsonl(rows: Iterable[dict[str, Any]], out: IO[str]) -> None:
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
