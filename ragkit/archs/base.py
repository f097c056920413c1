"""The inference protocol: an architecture loads into an `Answerer`, and every answerer takes question rows and
returns output rows (JSON objects). `ragkit generate` and `ragkit eval` are generic over it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from ragkit.io.queries import Question


class Answerer(Protocol):
    """What `load(model, options)` returns."""

    device: Any

    def answer(self, questions: Sequence[Question]) -> list[dict[str, Any]]: ...


def as_questions(rows: Iterable[Question | dict[str, Any] | str]) -> list[Question]:
    """Python callers may pass strings, JSON-like dicts (the CLI's input rows) or Question records."""
    from ragkit.errors import Location
    from ragkit.io.queries import question_from_json

    out = []
    for i, row in enumerate(rows, start=1):
        if isinstance(row, Question):
            out.append(row)
        elif isinstance(row, str):
            out.append(Question(str(i), row))
        else:
            out.append(question_from_json(row, Location("<rows>", i)))
    return out
