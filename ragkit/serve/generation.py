"""Generation behind the server: a ragkit answerer (`ragkit.load`) fed the passages the server retrieved,
so an answer reads the same index version its search returned, and concurrent questions are generated
in one batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ragkit.errors import UsageError
from ragkit.serve.backend import Query
from ragkit.serve.config import ServeConfig


@dataclass(frozen=True)
class GenerateJob:
    queries: list[Query]
    passages: list[list[dict[str, Any]]]  # per query: the hits it reads (empty for closed book)


class GenerationService:
    def __init__(self, config: ServeConfig) -> None:
        import ragkit
        from ragkit.archs.options import field_names
        from ragkit.archs.registry import get

        assert config.model is not None
        fields = field_names(get(config.arch).options_class(config.model))
        self.retrieves = "passages" in fields
        if config.arch != "none" and not self.retrieves:
            raise UsageError(f"--arch {config.arch} with {config.model}: this model retrieves with its own "
                             "trained retriever, which the server does not host; serve a plain generator "
                             "(retrieve-then-read) or a Self-RAG model")
        options: dict[str, Any] = {"max_new_tokens": config.max_new_tokens, "backend": config.generator_backend,
                                   "device": config.device, "dtype": config.dtype,
                                   "batch_size": config.generate_max_batch}
        if self.retrieves:
            options.update(passages="ctxs", k=config.k)
        self.answerer = ragkit.load(config.arch, config.model, **options)
        self.model = config.model

    def handle(self, jobs: list[GenerateJob]) -> list[list[dict[str, Any]]]:
        from ragkit.io.queries import Question

        questions = [Question(q.id, q.text, ctxs, dict(q.extra))
                     for job in jobs for q, ctxs in zip(job.queries, job.passages)]
        rows = self.answerer.answer(questions)
        out, at = [], 0
        for job in jobs:
            out.append(rows[at:at + len(job.queries)])
            at += len(job.queries)
        return out
