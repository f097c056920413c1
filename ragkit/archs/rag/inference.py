"""RAG's inference entry. A `ragkit train --arch rag` checkpoint (a folder with rag_config.json) decodes with
its own query encoder and RAG-Sequence / RAG-Token marginalisation; any other model is a plain generator and
answers retrieve-then-read (ragkit.archs.reader)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ragkit.io.queries import Question


@dataclass
class RagCheckpointOptions:
    what: ClassVar[str] = ("a trained RAG checkpoint (--arch rag, or transformers' RagSequenceForGeneration / "
                           "RagTokenForGeneration), which decodes with --rag-decoding and --num-beams")

    index: str | None = None  # default: the index it was trained with (required for a transformers checkpoint)
    k: int | None = None  # passages marginalised over (default: the n_docs it was trained with)
    max_new_tokens: int = 32
    rag_decoding: str | None = None  # token, token-beam, sequence-thorough, sequence-fast (default: its loss)
    num_beams: int = 4
    batch_size: int = 8  # questions retrieved for in one query-encoder pass
    device: str = "auto"
    quantize: str = "none"

    def check(self) -> None:
        from ragkit.errors import UsageError
        from ragkit.models.lm import check_loading

        if self.rag_decoding is not None and self.rag_decoding not in MODES:
            raise UsageError(f"--rag-decoding {self.rag_decoding}: expected one of {', '.join(MODES)}")
        if self.k is not None and self.k < 1:
            raise UsageError("--k must be at least 1")
        check_loading(quantize=self.quantize)


MODES = ("token", "token-beam", "sequence-thorough", "sequence-fast")  # --rag-decoding


def is_rag_checkpoint(path: str | Path) -> bool:
    """A `ragkit train --arch rag` checkpoint, or transformers' RagSequenceForGeneration / RagTokenForGeneration."""
    from ragkit.archs.rag.hf_checkpoint import hf_rag_class

    return (Path(path) / "rag_config.json").exists() or hf_rag_class(path) is not None


def read_input(path: str, *, limit: int, options: Any, task: str | None = None) -> list[Question]:
    """The questions; read-with-a-generator without an index needs every question to carry its passages, which
    is checked here, before any model loads: a missing index is a usage error (exit 2) naming the first
    question without them."""
    from ragkit.errors import UsageError
    from ragkit.io.queries import read_questions

    questions = read_questions(path, limit=limit, task=task)
    if isinstance(options, RagCheckpointOptions) or getattr(options, "index", None):
        return questions
    bare = next((q for q in questions if not q.ctxs), None)
    if bare is not None:
        where = f"{bare.where}: " if bare.where is not None else ""
        raise UsageError(f"{where}question '{bare.id}' has no passages ('ctxs' or 'hits') and no index was given "
                         "to retrieve them", hint="Pass --index DIR, or input rows with ctxs (or `ragkit index "
                                                  "search` output, with hits).")
    return questions


def options_class(model: str) -> type:
    """The options schema depends on what --model is: a trained checkpoint, or a generator to read with."""
    if is_rag_checkpoint(model):
        return RagCheckpointOptions
    from ragkit.archs.reader.inference import RetrieveReadOptions

    return RetrieveReadOptions


class RagCheckpointAnswerer:
    def __init__(self, rag: Any, options: RagCheckpointOptions, mode: str) -> None:
        self.rag, self.options, self.mode = rag, options, mode
        self.device = next(rag.parameters()).device

    def answer(self, questions: Sequence[Question]) -> list[dict[str, Any]]:
        from ragkit.archs.rag.decoding import decode
        from ragkit.io.passages import passage_json

        rows = []
        size = self.options.batch_size
        for start in range(0, len(questions), size):
            block = questions[start : start + size]
            began = time.perf_counter()
            answers = decode(self.rag, [q.extra.get("retrieval_query") or q.text for q in block], mode=self.mode,
                             max_new_tokens=self.options.max_new_tokens, num_beams=self.options.num_beams)
            per_q = (time.perf_counter() - began) / max(1, len(block))
            for q, a in zip(block, answers):
                passages = [{**passage_json(h.to_json()), "doc_prob": p} for h, p in zip(a.hits, a.doc_probs)]
                rows.append({"id": q.id, "question": q.text, "output": a.text, "passages": passages,
                             "log_prob": a.log_prob, "timings": {"generate_s": per_q}, **q.extra})
        return rows


def load(model: str, options: Any) -> Any:
    if not isinstance(options, RagCheckpointOptions):
        from ragkit.archs.reader.inference import load as load_reader

        return load_reader(model, options)
    from ragkit.archs.rag.decoding import load_rag_checkpoint
    from ragkit.models.encoder import resolve_device

    root = Path(model)
    if not (root / "rag_config.json").exists():  # transformers' RAG: converted once, then a ragkit checkpoint
        from ragkit.archs.rag.hf_checkpoint import import_hf_rag
        from ragkit.errors import UsageError

        if not options.index:
            raise UsageError(f"--model {model} is a transformers RAG checkpoint: give --index, a ragkit index of the "
                             "passages it reads (embedded by the DPR context encoder that goes with its question encoder)")
        root = import_hf_rag(model)
    rag = load_rag_checkpoint(root, device=resolve_device(options.device), index=options.index,
                              quantize=options.quantize)
    if options.k is not None:
        rag.config.n_docs = options.k
    mode = options.rag_decoding or ("token" if rag.config.loss == "token" else "sequence-thorough")
    return RagCheckpointAnswerer(rag, options, mode)
