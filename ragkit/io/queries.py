"""Queries for search: JSONL objects with `query` (or `question`/`text`) and optional `id`, or plain lines.

Every other field of a JSONL query is passed through to the output, so commands compose in pipes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragkit.errors import InputError, Location
from ragkit.io.jsonl import display_name, open_text

QUERY_FIELDS = ("query", "question", "text", "instruction")


@dataclass
class Query:
    id: str | None
    text: str
    extra: dict[str, Any] = field(default_factory=dict)


def iter_queries(path: str | Path) -> Iterator[Query]:
    name = display_name(path)
    handle = open_text(path)
    try:
        for lineno, line in enumerate(handle, start=1):
            stripped = line.strip()
            if not stripped:
                continue
            if not stripped.startswith("{"):
                yield Query(id=None, text=stripped)
                continue
            try:
                obj = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise InputError(Location(name, lineno), f"malformed JSON ({exc.msg} at column {exc.colno})") from None
            key = next((k for k in QUERY_FIELDS if k in obj), None)
            if key is None:
                raise InputError(Location(name, lineno, "query"), "field 'query' is missing")
            text = obj[key]
            if not isinstance(text, str) or not text.strip():
                raise InputError(Location(name, lineno, key), f"field '{key}' must be a non-empty string")
            qid = obj.get("id", obj.get("_id"))
            extra = {k: v for k, v in obj.items() if k not in ("id", "_id", "query")}
            yield Query(id=None if qid is None else str(qid), text=text, extra=extra)
    finally:
        if str(path) != "-":
            handle.close()
