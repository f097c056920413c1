"""The released Self-RAG vocabulary, token groups and prompt formats.

These strings are a data format, not code: a released checkpoint (selfrag/selfrag_llama2_7b, the critic
selfrag/self_rag_critic) only behaves as published when prompted with exactly these strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ragkit.errors import ResourceError

RETRIEVAL, NO_RETRIEVAL, CONTINUE = "[Retrieval]", "[No Retrieval]", "[Continue to Use Evidence]"
RELEVANT, IRRELEVANT = "[Relevant]", "[Irrelevant]"
FULLY, PARTIALLY, NO_SUPPORT = "[Fully supported]", "[Partially supported]", "[No support / Contradictory]"
UTILITY = tuple(f"[Utility:{i}]" for i in range(1, 6))
PARAGRAPH_OPEN, PARAGRAPH_CLOSE = "<paragraph>", "</paragraph>"

# the order in which the reference fine-tuning script adds them as additional special tokens
REFLECTION_TOKENS = (
    NO_RETRIEVAL, RETRIEVAL, CONTINUE, IRRELEVANT, RELEVANT, PARAGRAPH_OPEN, PARAGRAPH_CLOSE, *UTILITY,
    FULLY, PARTIALLY, NO_SUPPORT,
)
RETRIEVE_GROUP = (RETRIEVAL, NO_RETRIEVAL, CONTINUE)
ISREL_GROUP = (IRRELEVANT, RELEVANT)
ISSUP_GROUP = (FULLY, PARTIALLY, NO_SUPPORT)
ISUSE_GROUP = UTILITY
UTILITY_WEIGHTS = (-1.0, -0.5, 0.0, 0.5, 1.0)
# the reference strips these from answers (its list leaves out [Continue to Use Evidence])
UPSTREAM_CONTROL_TOKENS = tuple(t for t in REFLECTION_TOKENS if t != CONTINUE)

GENERATOR_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
GENERATOR_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
CRITIC_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"  # no trailing newline


def generator_prompt(instruction: str, input_text: str = "") -> str:
    if input_text:
        return GENERATOR_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return GENERATOR_PROMPT.format(instruction=instruction)


def evidence_block(passage: dict[str, Any]) -> str:
    """How a passage is appended to the prompt: `[Retrieval]<paragraph>{title}\\n{text}</paragraph>`."""
    return f"{RETRIEVAL}{PARAGRAPH_OPEN}{passage.get('title') or ''}\n{passage.get('text') or ''}{PARAGRAPH_CLOSE}"


def clean_answer(text: str, *, upstream: bool = False) -> str:
    """The answer without reflection tokens, end-of-text markers or newlines (as the reference post-processes)."""
    for token in UPSTREAM_CONTROL_TOKENS if upstream else REFLECTION_TOKENS:
        text = text.replace(token, "")
    for marker in ("</s>", "<|endoftext|>", "<|im_end|>", "\n"):
        text = text.replace(marker, "")
    if text[:1] in ("#", ":"):
        text = text[1:]
    return text.strip()


@dataclass(frozen=True)
class ReflectionIds:
    """Token ids of every reflection token in one tokenizer."""

    ids: dict[str, int]

    def group(self, names: tuple[str, ...]) -> dict[str, int]:
        return {name: self.ids[name] for name in names}

    @property
    def all_ids(self) -> list[int]:
        return [self.ids[t] for t in REFLECTION_TOKENS]


def reflection_ids(tokenizer: Any, where: str = "the model") -> ReflectionIds:
    """Ids of the reflection tokens; a clear error when the tokenizer lacks them (a plain, untrained model)."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in REFLECTION_TOKENS if t not in vocab]
    if missing:
        raise ResourceError(
            f"{where} has no Self-RAG reflection tokens (missing {', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''})",
            hint="Use a Self-RAG checkpoint (e.g. selfrag/selfrag_llama2_7b) or train one with "
                 "`ragkit train --arch selfrag`.",
        )
    return ReflectionIds({t: int(vocab[t]) for t in REFLECTION_TOKENS})


def add_reflection_tokens(tokenizer: Any, model: Any) -> list[int]:
    """Add the reflection tokens as special tokens and grow the embeddings; returns the ids that are new."""
    vocab = tokenizer.get_vocab()
    new = [t for t in REFLECTION_TOKENS if t not in vocab]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)  # atomic, never split; stable across transformers 4/5
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    vocab = tokenizer.get_vocab()
    return [int(vocab[t]) for t in new]
