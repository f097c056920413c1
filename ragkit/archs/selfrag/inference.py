"""Self-RAG's inference entry: a model with the reflection vocabulary (a hub id, a folder, or a `ragkit train
--arch selfrag` checkpoint) decodes with adaptive retrieval, short form or the segment beam search."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ragkit.archs.options import RetrievalOptions
from ragkit.archs.selfrag.scoring import ScoringConfig
from ragkit.io.queries import Question

CLOSED_TASKS = ("arc_c", "pubhealth", "fever", "scifact")  # sum scores per distinct answer
LONG_FORM_TASKS = ("asqa", "factscore")


@dataclass
class SelfRagOptions(RetrievalOptions, ScoringConfig):
    """Defaults follow the paper; --compat-upstream reproduces the reference scripts (docs/selfrag.md)."""

    what: ClassVar[str] = "--arch selfrag, which decodes greedily in the Self-RAG prompt format"

    # the scoring weights and switches (w_rel, w_sup, w_use, use_*, compat_upstream) come from ScoringConfig
    mode: str = "adaptive_retrieval"
    threshold: float = 0.2  # negative: retrieve iff the model writes [Retrieval]
    long_form: bool | None = None  # None: long form for asqa and factscore, short otherwise
    beam_width: int = 2
    max_depth: int = 6
    ignore_cont: bool = False
    task: str | None = None  # the eval task being answered: decides closed-set scoring and the default form
    max_new_tokens: int = 32
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    backend: str = "transformers"
    quantize: str = "none"
    trust_remote_code: bool = False
    tensor_parallel_size: int = 1  # vLLM: GPUs one model is split over (the reference scripts' --world_size)

    def check(self) -> None:
        from ragkit.models.lm import check_loading

        RetrievalOptions.check(self)
        check_loading(dtype=self.dtype, quantize=self.quantize, backend=self.backend,
                      tensor_parallel_size=self.tensor_parallel_size, device=self.device)
        self.decoding()

    def decoding(self) -> Any:
        from ragkit.archs.selfrag.decoding import SelfRagConfig

        scoring = ScoringConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ScoringConfig)})
        config = SelfRagConfig(
            mode=self.mode, threshold=self.threshold if self.threshold >= 0 else None, ndocs=self.k,
            max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, closed=self.task in CLOSED_TASKS,
            long_form=self.long_form if self.long_form is not None else self.task in LONG_FORM_TASKS,
            beam_width=self.beam_width, max_depth=self.max_depth, ignore_cont=self.ignore_cont, scoring=scoring)
        config.validate()
        return config


class SelfRagAnswerer:
    """Passages (the rows' ctxs / hits, or --index hits) are fetched only when the model decides to retrieve."""

    def __init__(self, decoder: Any, options: SelfRagOptions, retriever: Any) -> None:
        self.decoder, self.options, self.retriever = decoder, options, retriever
        self.use_index = options.passages == "index" or (options.passages == "auto" and retriever is not None)
        self.device = decoder.device

    def answer(self, questions: Sequence[Question]) -> list[dict[str, Any]]:
        from ragkit.archs.selfrag.decoding import SelfRagQuestion

        def fetch(q: Question) -> Any:
            if self.use_index:
                query = q.extra.get("retrieval_query") or q.text
                return lambda: [h.to_json() for h in self.retriever.retrieve([query], self.decoder.config.ndocs)[0]]
            return lambda: q.ctxs

        def text(q: Question) -> str:
            return q.upstream_text if self.options.compat_upstream and q.upstream_text else q.text

        return self.decoder.answer([SelfRagQuestion(q.id, text(q), fetch(q), q.extra) for q in questions])


def load(model: str, options: SelfRagOptions) -> SelfRagAnswerer:
    from ragkit.archs.selfrag.loading import load_selfrag_decoder

    config = options.decoding()
    retriever = options.retriever(options.device)
    decoder = load_selfrag_decoder(model, config, device=options.device, dtype=options.dtype,
                                   trust_remote_code=options.trust_remote_code, backend=options.backend,
                                   quantize=options.quantize, tensor_parallel_size=options.tensor_parallel_size)
    return SelfRagAnswerer(decoder, options, retriever)
