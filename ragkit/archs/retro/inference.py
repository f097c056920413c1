"""RETRO's inference entry: a `ragkit train --arch retro` checkpoint continues each prompt, retrieving from its
work folder at every chunk boundary. Its rows are prompts (`prompt`, `text` or `question`), not questions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ragkit.errors import UsageError
from ragkit.io.queries import Question

PROMPT_FIELDS = ("prompt", "text", "question")


@dataclass
class RetroOptions:
    what: ClassVar[str] = "--arch retro, which retrieves from its --workdir and continues raw text"

    workdir: str | None = None  # default: the work folder it was trained with
    no_retrieval: bool = False
    num_samples: int = 1
    unconditional: bool = False  # sample from the start-of-document token instead of reading prompts
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    filter_thres: float = 0.0  # RETRO-pytorch's top-k as a fraction: keep the top (1 - filter_thres) of the vocabulary
    top_p: float = 1.0
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        if not 0.0 <= self.filter_thres < 1.0:
            raise UsageError(f"--filter-thres {self.filter_thres}: expected a fraction in [0, 1) (RETRO-pytorch's 0.9 "
                             "keeps the top 10% of the vocabulary)")
        if self.filter_thres and self.top_k:
            raise UsageError("--filter-thres and --top-k both set top-k sampling: give one")
        if self.filter_thres and not self.do_sample:
            raise UsageError("--filter-thres filters sampling: add --do-sample (greedy decoding reads only the top token)")

    def top_k_for(self, vocab_size: int) -> int:
        """--top-k, or --filter-thres as RETRO-pytorch's top_k computes it: max(int((1 - thres) * vocabulary), 1)
        tokens (its floor included, so the same thres keeps the same tokens)."""
        if self.filter_thres:
            return max(int((1 - self.filter_thres) * vocab_size), 1)
        return self.top_k


class RetroAnswerer:
    block = 1  # one prompt at a time: a row is written as soon as it is sampled

    def __init__(self, loaded: Any, options: RetroOptions) -> None:
        from ragkit.archs.retro.generate import SamplingConfig

        self.loaded, self.options = loaded, options
        self.sampling = SamplingConfig(max_new_tokens=options.max_new_tokens,
                                       temperature=options.temperature if options.do_sample else 0.0,
                                       top_k=options.top_k_for(loaded.model.config.vocab_size), top_p=options.top_p,
                                       num_samples=options.num_samples,
                                       seed=options.seed)
        self.device = next(loaded.model.parameters()).device
        self.tokens = 0
        self.seconds = 0.0

    def answer(self, questions: Sequence[Question]) -> list[dict[str, Any]]:
        from ragkit.archs.retro.generate import prompt_ids, sample
        from ragkit.archs.retro.pipeline import end_of_document_id

        tokenizer = self.loaded.tokenizer
        rows = []
        for q in questions:
            result = sample(self.loaded.model, prompt_ids(tokenizer, q.text), self.sampling, self.loaded.retriever,
                            eos_id=end_of_document_id(tokenizer))
            outputs = [tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]
            new = sum(len(t) for t in result.tokens)
            self.tokens, self.seconds = self.tokens + new, self.seconds + result.seconds
            row = {"id": q.id, "prompt": q.text, "output": outputs[0], "new_tokens": len(result.tokens[0]),
                   "retrieved": result.retrieved,
                   "timings": {"generate_s": round(result.seconds, 4), "retrieval_s": round(result.retrieval_seconds, 4),
                               "tokens_per_s": round(new / result.seconds, 2) if result.seconds else None}}
            if len(outputs) > 1:
                row["samples"] = outputs
            rows.append(row)
        return rows

    def summary(self) -> str | None:
        if not self.seconds:
            return None
        return f"retro: {self.tokens} tokens in {self.seconds:.1f}s ({self.tokens / self.seconds:.1f} tokens/s)"


def read_input(path: str, *, limit: int, options: RetroOptions, task: str | None = None) -> list[Question]:
    """Prompts from JSONL (prompt, text or question; optional id) or plain lines; one empty prompt with
    --unconditional."""
    from ragkit.errors import InputError, Location
    from ragkit.io.jsonl import display_name, iter_records

    if options.unconditional:
        return [Question("0", "")]
    name = display_name(path)
    prompts: list[Question] = []
    for lineno, record in iter_records(path):
        if isinstance(record, dict):
            text = next((record[f] for f in PROMPT_FIELDS if isinstance(record.get(f), str)), None)
            if text is None:
                raise InputError(Location(name, lineno, "prompt"), "missing: give prompt, text or question")
            prompts.append(Question(str(record.get("id", lineno)), text))
        else:
            prompts.append(Question(str(lineno), record))
        if limit and len(prompts) >= limit:
            break
    return prompts


def load(model: str, options: RetroOptions) -> RetroAnswerer:
    from ragkit.archs.retro.generate import load_retro

    loaded = load_retro(model, workdir=options.workdir, device=options.device, retrieval=not options.no_retrieval)
    return RetroAnswerer(loaded, options)
