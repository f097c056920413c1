"""Answer metrics: SQuAD EM / token F1, Self-RAG's `match`, multiple-choice and claim accuracy, ASQA str-em.

Definitions follow their reference code (SQuAD v1.1 evaluate script; AkariAsai/self-rag
retrieval_lm/metrics.py and run_short_form.py; ALCE's str-em) so that numbers are comparable.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", flags=re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation, drop a/an/the, squeeze white space."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    norm = normalize_answer(prediction)
    return float(any(norm == normalize_answer(g) for g in golds))


def _f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    return max((_f1(prediction, g) for g in golds), default=0.0)


def selfrag_match(prediction: str, golds: Sequence[str]) -> float:
    """Self-RAG's `match`: 1 if any gold answer is a substring of the raw output (case-sensitive)."""
    return float(any(g in prediction for g in golds))


def normalized_match(prediction: str, golds: Sequence[str]) -> float:
    """`match` after SQuAD normalisation of both sides (case- and punctuation-insensitive)."""
    norm = normalize_answer(prediction)
    return float(any(normalize_answer(g) and normalize_answer(g) in norm for g in golds))


CHOICE_LABELS = "ABCDE"
_NUMERIC_TO_LETTER = {"1": "A", "2": "B", "3": "C", "4": "D", "5": "E"}


def choice_letter(label: str) -> str:
    """ARC labels come as A-E or 1-5 (NYSED items); Self-RAG shows both as A-E in the prompt."""
    return _NUMERIC_TO_LETTER.get(label.strip(), label.strip().upper())


def parse_choice(prediction: str, choices: Sequence[str]) -> str | None:
    """The letter a multiple-choice answer picks: a leading/standalone letter, else a choice's text."""
    text = prediction.strip()
    match = re.match(r"^\(?([A-E])\b[\):.]?", text)
    if match:
        return match.group(1)
    match = re.search(r"\b(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-E])\b", text, flags=re.IGNORECASE)
    if match:
        return match.group(1).upper()
    lowered = normalize_answer(text)
    hits = [CHOICE_LABELS[i] for i, c in enumerate(choices) if c and normalize_answer(c) and normalize_answer(c) in lowered]
    return hits[0] if len(hits) == 1 else None


def choice_accuracy(prediction: str, gold_label: str, choices: Sequence[str]) -> float:
    return float(parse_choice(prediction, choices) == choice_letter(gold_label))


def claim_label(prediction: str) -> str | None:
    """true/false from a fact-checking output, mapping SUPPORTS/REFUTES as Self-RAG does."""
    if "SUPPORTS" in prediction:
        return "true"
    if "REFUTES" in prediction:
        return "false"
    words = re.findall(r"[a-z]+", prediction.lower())
    for word in words:
        if word in ("true", "yes", "correct", "supported", "supports"):
            return "true"
        if word in ("false", "no", "incorrect", "refuted", "refutes", "wrong"):
            return "false"
    return None


def gold_claim_label(label: str) -> str:
    return {"SUPPORTS": "true", "SUPPORT": "true", "REFUTES": "false", "CONTRADICT": "false"}.get(label, label.lower())


def str_em(prediction: str, short_answer_groups: Sequence[Sequence[str]]) -> float:
    """ALCE's str-em for ASQA: the share of sub-questions whose short answers (any alias) appear in the output."""
    if not short_answer_groups:
        return 0.0
    norm = normalize_answer(prediction)
    found = sum(any(normalize_answer(a) in norm for a in group if normalize_answer(a)) for group in short_answer_groups)
    return found / len(short_answer_groups)


