"""Closed-book and retrieve-then-read answering: questions (+ passages) -> prompts -> generator -> rows.

Questions are read by ragkit.io.queries (one record and alias table for every reader).

Passages come from a ragkit index (`Retriever`) or from the `ctxs` the input already carries
(Self-RAG eval files ship their Contriever passages that way).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ragkit.errors import InputError, Location, UsageError
from ragkit.io.passages import passage_json as _passage_json
from ragkit.io.queries import Question
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
