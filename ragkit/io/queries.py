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

# The one alias table for the text of a query or question, read the same by `index search`, `generate`
# and `eval` (ragkit/reader.py): `question` first (QA files, Self-RAG's evals), `query` (search output and
# input), `instruction` (Self-RAG training and long-form files), `text` (BEIR queries).
QUERY_FIELDS = ("question", "query", "instruction", "text")


def query_field(record: dict[str, Any]) -> str | None:
    """The field that holds `record`'s query text: the first of QUERY_FIELDS that is a non-empty string."""
    return next((k for k in QUERY_FIELDS if isinstance(record.get(k), str) and record[k].strip()), None)


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
        key = query_field(record)
        if key is None:
            present = next((k for k in QUERY_FIELDS if k in record), None)
            if present is not None:
                raise InputError(Location(name, lineno, present), f"field '{present}' must be a non-empty string")
            raise InputError(Location(name, lineno, "query"), f"field 'query' is missing (give one of {', '.join(QUERY_FIELDS)})")
        text = record[key]
        qid = record.get("id", record.get("_id"))
        extra = {k: v for k, v in record.items() if k not in ("id", "_id", "query")}
        yield Query(id=None if qid is None else str(qid), text=text, extra=extra)
