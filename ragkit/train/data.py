"""Training pairs: the HF RAG layout (`train.source` / `train.target`, `val.*`) or JSONL (`question`, `answers`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ragkit.errors import InputError, Location, ResourceError
from ragkit.io.jsonl import read_jsonl, read_text


@dataclass(frozen=True)
class Pair:
    question: str
    answer: str


def read_pairs(path: str | Path, split: str = "train") -> list[Pair]:
    p = Path(path)
    if p.is_dir():
        return _read_source_target(p, split)
    if not p.exists():
        raise ResourceError(f"{p}: no such file or folder")
    pairs = []
    for lineno, obj in read_jsonl(p):
        question = obj.get("question", obj.get("query"))
        if not isinstance(question, str) or not question.strip():
            raise InputError(Location(str(p), lineno, "question"), "field 'question' is missing")
        answers = obj.get("answers", obj.get("answer", obj.get("target")))
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not answers or not isinstance(answers[0], str) or not answers[0].strip():
            raise InputError(Location(str(p), lineno, "answers"), "field 'answers' is missing or empty")
        pairs.append(Pair(question, answers[0]))
    if not pairs:
        raise InputError(Location(str(p)), "empty input: no training pairs")
    return pairs


def _read_source_target(folder: Path, split: str) -> list[Pair]:
    source, target = folder / f"{split}.source", folder / f"{split}.target"
    for f in (source, target):
        if not f.exists():
            raise ResourceError(f"{f}: missing (the HF RAG layout has {split}.source and {split}.target)")
    questions = read_text(source).split("\n")
    answers = read_text(target).split("\n")
    if questions and questions[-1] == "":
        questions.pop()
    if answers and answers[-1] == "":
        answers.pop()
    if len(questions) != len(answers):
        raise InputError(Location(str(target)), f"{len(answers)} targets for {len(questions)} sources")
    pairs = []
    for lineno, (q, a) in enumerate(zip(questions, answers), start=1):
        if not q.strip():
            raise InputError(Location(str(source), lineno), "empty source line")
        if not a.strip():
            raise InputError(Location(str(target), lineno), "missing target")
        pairs.append(Pair(q.strip(), a.strip()))
    if not pairs:
        raise InputError(Location(str(source)), "empty input: no training pairs")
    return pairs
