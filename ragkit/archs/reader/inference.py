"""The reader's inference entry: any generator answers closed-book (`--arch none`) or reads retrieved passages
(`--arch rag` with a plain model: retrieve-then-read)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ragkit.archs.options import RetrievalOptions
from ragkit.errors import UsageError
from ragkit.io.queries import Question


@dataclass
class ClosedBookOptions:
    what: ClassVar[str] = "--arch none (closed book)"

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] | None = None  # None: a newline
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    backend: str = "transformers"
    quantize: str = "none"
    template: str | None = None
    seed: int = 0
    trust_remote_code: bool = False
    tensor_parallel_size: int = 1  # vLLM: GPUs one model is split over (the Self-RAG scripts' --world_size)

    def check(self) -> None:
        from ragkit.models.lm import check_loading

        check_loading(dtype=self.dtype, quantize=self.quantize, backend=self.backend,
                      tensor_parallel_size=self.tensor_parallel_size, device=self.device)

    def generation(self) -> Any:
        from ragkit.models.generator import GenerationConfig

        return GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                                temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                stop=tuple(self.stop) if self.stop is not None else ("\n",),
                                batch_size=self.batch_size, seed=self.seed)


@dataclass
class RetrieveReadOptions(RetrievalOptions, ClosedBookOptions):
    what: ClassVar[str] = "--arch rag with a plain generator (retrieve-then-read)"

    max_passage_words: int = 150

    def check(self) -> None:
        RetrievalOptions.check(self)
        ClosedBookOptions.check(self)


class ReaderAnswerer:
    """Retrieve-then-read with RetrieveReadOptions (passages from `retriever`, or the rows' own), else closed book."""

    def __init__(self, generator: Any, options: ClosedBookOptions, retriever: Any = None) -> None:
        from ragkit.archs.reader.answer import ReaderConfig

        self.generator, self.retriever, self.options = generator, retriever, options
        self.generation = options.generation()
        if isinstance(options, RetrieveReadOptions):
            self.reader = ReaderConfig(arch="rag", k=options.k, source=options.passages,
                                       max_passage_words=options.max_passage_words, template=options.template)
        else:
            self.reader = ReaderConfig(arch="none", template=options.template)
        self.device = generator.device

    def answer(self, questions: Sequence[Question]) -> list[dict[str, Any]]:
        from ragkit.archs.reader.answer import answer

        return answer(questions, self.generator, self.generation, self.reader, self.retriever)


def load(model: str, options: ClosedBookOptions) -> ReaderAnswerer:
    from ragkit.archs.rag.inference import is_rag_checkpoint
    from ragkit.models.generator import load_generator

    retrieve = isinstance(options, RetrieveReadOptions)
    if is_rag_checkpoint(model) and not retrieve:
        raise UsageError(f"{model} is a trained RAG checkpoint: use --arch rag")
    retriever = options.retriever(options.device) if retrieve else None
    generator = load_generator(model, backend=options.backend, device=options.device, dtype=options.dtype,
                               trust_remote_code=options.trust_remote_code, quantize=options.quantize,
                               tensor_parallel_size=options.tensor_parallel_size)
    return ReaderAnswerer(generator, options, retriever)
