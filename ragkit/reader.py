"""Closed-book and retrieve-then-read answering: questions (+ passages) -> prompts -> generator -> rows.

Passages come from a ragkit index (`Retriever`) or from the `ctxs` the input already carries
(Self-RAG eval files ship their Contriever passages that way).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ragkit.errors import InputError, Location, UsageError
from ragkit.io.passages import passage_json as _passage_json
from ragkit.models.generator import GenerationConfig

CLOSED_BOOK_PROMPT = "Answer the question. Reply with only the answer, in a few words.\n\nQuestion: {question}"
RAG_PROMPT = (
    "Answer the question using the passages. Reply with only the answer, in a few words.\n\n"
    "{passages}\n\nQuestion: {question}"
)
ARCHS = ("none", "rag")
SOURCES = ("auto", "index", "ctxs", "hits")  # hits: the same as ctxs, named as `index search` writes them


@dataclass(frozen=True)
class ReaderConfig:
    arch: str = "none"  # none: closed book; rag: retrieve (or use ctxs), then read
    k: int = 5  # passages per question
    source: str = "auto"  # where passages come from: index, ctxs, or auto (index if given, else ctxs)
    max_passage_words: int = 150  # long passages are cut to this many words (0 = keep whole)
    template: str | None = None  # a raw prompt template with {prompt}, for models without a chat template
    system: str | None = None


@dataclass
class Question:
    id: str
    text: str
    ctxs: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


PASSAGE_FIELDS = ("ctxs", "hits")  # Self-RAG / DPR files carry `ctxs`; `ragkit index search` writes `hits`


def question_from_json(obj: dict[str, Any], where: Location) -> Question:
    from ragkit.io.queries import QUERY_FIELDS, query_field

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
    return Question(str(qid) if qid is not None else str(where.line), text, ctxs, extra)


def questions_from_examples(examples: Sequence[Any]) -> list[Question]:
    """Eval-task examples as questions; the retriever searches with the bare question or claim."""
    return [Question(ex.id, ex.question, ex.ctxs, {"retrieval_query": ex.query or ex.question}) for ex in examples]


def read_questions(path: str, *, limit: int = 0, task: str | None = None) -> list[Question]:
    """Questions from JSONL or plain lines (a line's number is its id), or from an eval task's file."""
    from ragkit.io.jsonl import display_name, iter_records

    if task is not None:
        from ragkit.eval.tasks import get_task, load_examples

        return questions_from_examples(load_examples(get_task(task), path, limit or None))
    name = display_name(path)
    questions: list[Question] = []
    for lineno, record in iter_records(path):
        if isinstance(record, str):
            questions.append(Question(str(lineno), record))
        else:
            questions.append(question_from_json(record, Location(name, lineno)))
        if limit and len(questions) >= limit:
            break
    if not questions:
        raise InputError(Location(name), "empty input: no questions")
    return questions


def format_passages(passages: Sequence[dict[str, Any]], max_words: int) -> str:
    blocks = []
    for i, p in enumerate(passages, start=1):
        text = " ".join(str(p.get("text", "")).split())
        if max_words:
            words = text.split(" ")
            text = " ".join(words[:max_words]) + (" ..." if len(words) > max_words else "")
        title = str(p.get("title") or "").strip()
        blocks.append(f"[{i}] {title}\n{text}" if title else f"[{i}] {text}")
    return "\n\n".join(blocks)


def user_message(question: str, passages: Sequence[dict[str, Any]], config: ReaderConfig) -> str:
    if config.arch == "none" or not passages:
        return CLOSED_BOOK_PROMPT.format(question=question)
    return RAG_PROMPT.format(question=question, passages=format_passages(passages, config.max_passage_words))


def _use_index(config: ReaderConfig, retriever: Any) -> bool:
    """Whether passages come from the index (else from the input's ctxs)."""
    use_index = config.source == "index" or (config.source == "auto" and retriever is not None)
    if use_index and retriever is None:
        raise UsageError("--passages index needs --index DIR")
    return use_index


def answer(questions: Sequence[Question], generator: Any, gen_config: GenerationConfig, config: ReaderConfig,
           retriever: Any = None) -> list[dict[str, Any]]:
    """Answer a block of questions; returns one output row per question, in input order."""
    if config.arch not in ARCHS:
        raise UsageError(f"--arch {config.arch}: expected one of {', '.join(ARCHS)} here")
    if config.source not in SOURCES:
        raise UsageError(f"--passages {config.source}: expected one of {', '.join(SOURCES)}")
    if config.k < 1:
        raise UsageError("--k must be at least 1")
    passages: list[list[dict[str, Any]]] = [[] for _ in questions]
    retrieve_s = 0.0
    if config.arch == "rag":
        if _use_index(config, retriever):
            began = time.perf_counter()
            hits = retriever.retrieve([q.extra.get("retrieval_query") or q.text for q in questions], config.k)
            retrieve_s = time.perf_counter() - began
            passages = [[{**h.to_json()} for h in row] for row in hits]
        else:
            for i, q in enumerate(questions):
                if not q.ctxs:
                    raise InputError(
                        Location("<input>", None, "ctxs"),
                        f"question '{q.id}' has no passages ('ctxs' or 'hits') and no --index was given for --arch rag",
                        hint="Pass --index DIR, or input rows with ctxs (or `ragkit index search` output, with hits).",
                    )
                passages[i] = q.ctxs[: config.k]
    prompts = [generator.render(user_message(q.text, p, config), template=config.template, system=config.system)
               for q, p in zip(questions, passages)]
    # longest first, so each batch pads little; results go back to input order
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    began = time.perf_counter()
    generated = generator.generate([prompts[i] for i in order], gen_config)
    generate_s = time.perf_counter() - began
    outputs: list[Any] = [None] * len(prompts)
    for i, g in zip(order, generated):
        outputs[i] = g
    rows = []
    per_q = 1.0 / max(1, len(questions))
    for q, p, g in zip(questions, passages, outputs):
        rows.append({
            "id": q.id,
            "question": q.text,
            "output": g.text,
            "passages": [_passage_json(x) for x in p],
            "new_tokens": g.new_tokens,
            "timings": {"retrieve_s": retrieve_s * per_q, "generate_s": generate_s * per_q},
            **q.extra,
        })
    return rows


def answer_with_rag_checkpoint(questions: Sequence[Question], rag: Any, *, decoding: Any,
                               max_new_tokens: int) -> list[dict[str, Any]]:
    """Answer with a trained RAG model (its own query encoder, index and marginal decoding)."""
    from ragkit.models.rag_decoding import decode

    began = time.perf_counter()
    answers = decode(rag, [q.extra.get("retrieval_query") or q.text for q in questions], mode=decoding.mode,
                     max_new_tokens=max_new_tokens, num_beams=decoding.num_beams)
    per_q = (time.perf_counter() - began) / max(1, len(questions))
    rows = []
    for q, a in zip(questions, answers):
        passages = [{**_passage_json(h.to_json()), "doc_prob": p} for h, p in zip(a.hits, a.doc_probs)]
        rows.append({"id": q.id, "question": q.text, "output": a.text, "passages": passages,
                     "log_prob": a.log_prob, "timings": {"generate_s": per_q}, **q.extra})
    return rows


def answer_with_selfrag(questions: Sequence[Question], decoder: Any, config: ReaderConfig,
                        retriever: Any = None) -> list[dict[str, Any]]:
    """Answer with Self-RAG; passages (the input's ctxs, or --index hits) are fetched only when it retrieves."""
    from ragkit.models.selfrag.decoding import SelfRagQuestion

    use_index = _use_index(config, retriever)

    def fetch(q: Question) -> Any:
        if use_index:
            return lambda: [h.to_json() for h in retriever.retrieve([q.extra.get("retrieval_query") or q.text],
                                                                    decoder.config.ndocs)[0]]
        return lambda: q.ctxs

    return decoder.answer([SelfRagQuestion(q.id, q.text, fetch(q), q.extra) for q in questions])
