"""The architecture registry: what `--arch NAME` means to `train`, `generate`, `eval` and `ragkit.load`.

Entries name modules as strings and import them on use, so that `ragkit --help` loads no torch.
An inference module provides `load(model, options) -> Answerer` (ragkit.archs.base), its options dataclass
(`options_class(model)` where the schema depends on the model, e.g. a trained RAG checkpoint), and optionally
`read_input(path, limit=, options=)` when its rows are not questions (RETRO reads prompts)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from ragkit.errors import UsageError


def _attr(spec: str) -> Any:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Architecture:
    name: str
    summary: str
    training: str | None = None  # "module:factory" of the trainer's Arch hooks (ragkit.train.trainer.Arch)
    inference: str | None = None  # module with load(model, options)
    options: str | None = None  # "module:Class": the inference options, when one class serves every model

    def trainer_arch(self) -> Any:
        if self.training is None:
            raise UsageError(f"--arch {self.name} is not trained", hint=f"Trainable: {', '.join(TRAINABLE)}.")
        return _attr(self.training)()

    def inference_module(self) -> Any:
        if self.inference is None:
            raise UsageError(f"--arch {self.name} does not answer questions",
                             hint=f"Answering architectures: {', '.join(ANSWERING)}.")
        return importlib.import_module(self.inference)

    def options_class(self, model: str) -> type:
        module = self.inference_module()
        return _attr(self.options) if self.options else module.options_class(model)

    def load(self, model: str, options: Any) -> Any:
        return self.inference_module().load(model, options)

    def read_input(self, path: str, *, limit: int, task: str | None, options: Any) -> list[Any]:
        module = self.inference_module()
        if hasattr(module, "read_input"):
            return module.read_input(path, limit=limit, options=options, task=task)
        from ragkit.io.queries import read_questions

        return read_questions(path, limit=limit, task=task)


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("none", "closed book: any generator answers alone",
                 inference="ragkit.archs.reader.inference", options="ragkit.archs.reader.inference:ClosedBookOptions"),
    Architecture("rag", "retrieve-then-read with any generator, or a trained RAG checkpoint (RAG-Sequence / RAG-Token)",
                 training="ragkit.archs.rag.training:RagArch", inference="ragkit.archs.rag.inference"),
    Architecture("selfrag", "Self-RAG generator: reflection tokens, adaptive retrieval, segment beam search",
                 training="ragkit.archs.selfrag.training:generator_arch", inference="ragkit.archs.selfrag.inference",
                 options="ragkit.archs.selfrag.inference:SelfRagOptions"),
    Architecture("selfrag-critic", "Self-RAG critic: judges retrieval need, relevance, support and utility",
                 training="ragkit.archs.selfrag.training:critic_arch",
                 inference="ragkit.archs.selfrag.critic_inference",
                 options="ragkit.archs.selfrag.critic_inference:CriticOptions"),
    Architecture("retro", "RETRO: chunked cross-attention over neighbours from its work folder",
                 training="ragkit.archs.retro.training:RetroArch", inference="ragkit.archs.retro.inference",
                 options="ragkit.archs.retro.inference:RetroOptions"),
    Architecture("embedder", "contrastive fine-tuning of the embedder (hard negatives from an index)",
                 training="ragkit.archs.embedder.training:EmbedderArch"),
)}
TRAINABLE = tuple(name for name, a in ARCHITECTURES.items() if a.training)
ANSWERING = tuple(name for name, a in ARCHITECTURES.items() if a.inference)


def get(name: str, *, flag: str = "--arch") -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UsageError(f"{flag} {name}: expected one of {', '.join(ARCHITECTURES)}") from None


def load(arch: str, model: str, **options: Any) -> Any:
    """An answerer for `model` under architecture `arch`, with its inference options as keywords:

        answerer = ragkit.load("rag", "runs/rag/final", k=3)
        rows = answerer.answer(["Who wrote Hamlet?"])

    The same loading `ragkit generate --arch ARCH` does; unknown keywords are refused, naming the known ones."""
    from ragkit.archs.options import options_from_keywords

    architecture = get(arch, flag="arch")
    cls = architecture.options_class(model)
    answerer = architecture.load(model, options_from_keywords(cls, options, f"arch {arch!r} ({cls.__name__})"))
    return _PythonAnswerer(answerer)


def fit(config: Any, *, resume: bool = False) -> Any:
    """Train `config.arch` on the one trainer (what `ragkit train` runs): a TrainConfig in, the cost report
    out; checkpoints, metrics.jsonl and OUTPUT/final/ are written as the command writes them."""
    from ragkit.train.trainer import train

    config.validate()
    config.require_paths()
    return train(config, get(config.arch).trainer_arch(), resume=resume)


class _PythonAnswerer:
    """An answerer whose `answer` also takes strings and dicts (the Python caller's rows)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.device = inner.device

    def answer(self, rows: Any) -> list[dict[str, Any]]:
        from ragkit.archs.base import as_questions

        return self.inner.answer(as_questions(rows))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
