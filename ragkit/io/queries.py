"""Queries for search: JSONL objects with `query` (or `question`/`text`) and optional `id`, or plain lines.

Every other field of a JSONL query is passed through to the output, so commands compose in pipes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragkit.errors import InputError, Location
from ragkit.io.jsonl import display_name, iter_records

QUERY_FIELDS = ("query", "question", "text", "instruction")


@dataclass
class Query:
    id: str | None
    text: str
    extra: dict[str, Any] = field(default_factory=dict)


def iter_queries(path: str | Path) -> Iterator[Query]:
    name = display_name(path)
    for lineno, record in iter_records(path):
        if isinstance(record, str):
            yield Query(id=None, text=record)
            continue
        key = next((k for k in QUERY_FIELDS if k in record), None)
        if key is None:
            raise InputError(Location(name, lineno, "query"), "field 'query' is missing")
        text = record[key]
        if not isinstance(text, str) or not text.strip():
            raise InputError(Location(name, lineno, key), f"field '{key}' must be a non-empty string")
        qid = record.get("id", record.get("_id"))
        extra = {k: v for k, v in record.items() if k not in ("id", "_id", "query")}
        yield Query(id=None if qid is None else str(qid), text=text, extra=extra)
