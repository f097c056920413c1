"""Queries and questions: JSONL objects with `question` (or `query`/`instruction`/`text`) and optional `id`, or
plain lines. `Query` is what `index search` reads; `Question` what every answering architecture reads (with the
passages the row carries).

Every other field of a JSONL query is passed through to the output, so commands compose in pipes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragkit.errors import InputError, Location
from ragkit.io.jsonl import display_name, iter_records

# The one alias table for the text of a query or question, read the same by `index search`, `generate`
# and `eval`: `question` first (QA files, Self-RAG's evals), `query` (search output and
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


@dataclass
class Question:
    id: str
    text: str
    ctxs: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    upstream_text: str | None = None  # Self-RAG --compat-upstream: the reference scripts' prompt, where it differs
    where: Location | None = None  # the file and line it was read from (for messages about it)


PASSAGE_FIELDS = ("ctxs", "hits")  # Self-RAG / DPR files carry `ctxs`; `ragkit index search` writes `hits`


def question_from_json(obj: dict[str, Any], where: Location) -> Question:
    key = query_field(obj)
    if key is None:
        raise InputError(Location(where.path, where.line, "question"),
                         f"field 'question' is missing (or one of {', '.join(QUERY_FIELDS[1:])})")
    text = obj[key]
    qid = obj.get("id", obj.get("_id"))
    carried = next((name for name in PASSAGE_FIELDS if obj.get(name)), "ctxs")
    ctxs = obj.get(carried) or []
    if not isinstance(ctxs, list) or not all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in ctxs):
        raise InputError(Location(where.path, where.line, carried),
                         f"field '{carried}' must be a list of {{title, text}} objects")
    extra = {k: v for k, v in obj.items() if k not in ("id", "_id", *PASSAGE_FIELDS, key)}
    return Question(str(qid) if qid is not None else str(where.line), text, ctxs, extra, where=where)


def questions_from_examples(examples: Sequence[Any]) -> list[Question]:
    """Eval-task examples as questions; the retriever searches with the bare question or claim."""
    return [Question(ex.id, ex.question, ex.ctxs, {"retrieval_query": ex.query or ex.question}, ex.upstream_text)
            for ex in examples]


def read_questions(path: str, *, limit: int = 0, task: str | None = None) -> list[Question]:
    """Questions from JSONL or plain lines (a line's number is its id), or from an eval task's file."""
    if task is not None:
        from ragkit.eval.tasks import get_task, load_examples

        return questions_from_examples(load_examples(get_task(task), path, limit or None))
    name = display_name(path)
    questions: list[Question] = []
    for lineno, record in iter_records(path):
        if isinstance(record, str):
            questions.append(Question(str(lineno), record, where=Location(name, lineno)))
        else:
            questions.append(question_from_json(record, Location(name, lineno)))
        if limit and len(questions) >= limit:
            break
    if not questions:
        raise InputError(Location(name), "empty input: no questions")
    return questions
