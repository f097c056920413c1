"""What run_short_form.py (AkariAsai/self-rag at HEAD 1fcdc42) does to a continuation's text, for
`compat_upstream`: pure functions over strings, so that tests cover texts a small model never writes.

The reference reads `outputs[0].text` from vLLM, whose default `skip_special_tokens=True` has already removed
every reflection token (they are special tokens of its tokenizer) while spaces and newlines stay; vLLM writes
that text incrementally, continuing the last tokens of the prompt, so a first word keeps its leading space.
`vllm_plain_text` reproduces that text from token ids; the rest is the script's post-processing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ragkit.archs.selfrag.tokens import UPSTREAM_CONTROL_TOKENS  # retrieval_lm/utils.py `control_tokens` (line 52)

# vLLM's incremental detokeniser starts from the prompt's last tokens (vllm INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)
PROMPT_TAIL_TOKENS = 5


def vllm_plain_text(tokenizer: Any, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The continuation `new_ids` as vLLM returns its text with skip_special_tokens=True: special tokens
    dropped, decoded after the prompt's last non-special tokens and cut after them (so a leading space that a
    sentencepiece word carries is kept), tokenizer clean-up off as in convert_tokens_to_string."""
    special = set(tokenizer.all_special_ids) | _added_special_ids(tokenizer)
    tail = [t for t in prompt_ids if t not in special][-PROMPT_TAIL_TOKENS:]
    body = [t for t in new_ids if t not in special]

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    prefix, whole = decode(tail), decode(tail + body)
    return whole[len(prefix):] if whole.startswith(prefix) else decode(body)


def _added_special_ids(tokenizer: Any) -> set[int]:
    """Tokens added with special=True (how ragkit and the reference add the reflection tokens)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {int(i) for i, token in decoder.items() if getattr(token, "special", False)}


def postprocess_answer_option_conditioned(answer: str) -> str:
    """run_short_form.py lines 36-48: control tokens, `</s>`, newlines and `<|endoftext|>` removed; no strip."""
    for token in UPSTREAM_CONTROL_TOKENS:
        answer = answer.replace(token, "")
    for marker in ("</s>", "\n", "<|endoftext|>"):
        answer = answer.replace(marker, "")
    return answer


def strip_leading_mark(prediction: str) -> str:
    """main(), line 331: one leading '#' or ':' removed. (The reference raises IndexError on an empty
    prediction there; ragkit returns it empty.)"""
    return prediction[1:] if prediction[:1] in ("#", ":") else prediction


def candidate_answer(text: str, *, retrieved: bool, closed: bool) -> str:
    """The answer the reference gives when this continuation is chosen: an open task's retrieved continuation
    raw (line 199), any other post-processed (lines 179, 187); then main()'s leading-mark strip."""
    return strip_leading_mark(text if retrieved and not closed else postprocess_answer_option_conditioned(text))


def choose(texts: Sequence[str], scores: Sequence[float], *, closed: bool) -> int:
    """The candidate call_model_rerank_w_scores_batch picks among retrieved continuations (vLLM plain texts):
    a closed task sums the scores of continuations whose post-processed texts are equal (lines 184-192) and
    answers with the best sum; an open task takes the best score (lines 194-199). Ties go to the first, as
    its stable sorts do; for a closed task the first continuation of the chosen group is returned."""
    if not closed:
        return max(range(len(scores)), key=lambda i: scores[i])
    keys = [postprocess_answer_option_conditioned(text) for text in texts]
    totals: dict[str, float] = {}
    for key, score in zip(keys, scores):
        totals[key] = totals.get(key, 0.0) + score
    return keys.index(max(totals, key=lambda key: totals[key]))
