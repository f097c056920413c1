"""Answer metrics on hand-checked cases, and the 95% intervals."""

from __future__ import annotations

import pytest

from ragkit.eval import qa_metrics as qm
from ragkit.eval.report import aggregate, mean_interval, wilson_interval


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an   apple, a pear and the plum. ", "apple pear and plum"),
        ("Théâtre  du Châtelet", "théâtre du châtelet"),  # unicode letters are kept, only case folds
        ("Then, ANOTHER", "then another"),  # 'the' inside a word is not an article
        ("", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert qm.normalize_answer(text) == expected


def test_exact_match_and_f1_take_the_best_gold() -> None:
    golds = ["Paris", "City of Light"]
    assert qm.exact_match("paris.", golds) == 1.0
    assert qm.exact_match("Paris, France", golds) == 0.0
    # "the city of lights": tokens city, of, lights vs city, of, light -> 2 common; P=2/3, R=2/3
    assert qm.token_f1("the city of lights", golds) == pytest.approx(2 / 3)
    assert qm.token_f1("", golds) == 0.0 and qm.exact_match("", golds) == 0.0
    assert qm.token_f1("a", ["the"]) == 1.0  # both normalise to nothing: SQuAD counts that as a match


def test_selfrag_match_is_raw_and_case_sensitive() -> None:
    assert qm.selfrag_match("He was a politician.", ["politician", "pol"]) == 1.0
    assert qm.selfrag_match("He was a Politician.", ["politician"]) == 0.0
    assert qm.normalized_match("He was a Politician.", ["politician"]) == 1.0
    assert qm.selfrag_match("", ["x"]) == 0.0
    assert qm.normalized_match("anything", ["the"]) == 0.0  # a gold that normalises to nothing never matches


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("B", "B"), ("(C) because", "C"), ("D: a solar cell", "D"), ("The answer is A.", "A"),
        ("photosynthesis", "B"), ("I am not sure", None), ("All of them", None),
    ],
)
def test_parse_choice(prediction: str, expected: str | None) -> None:
    assert qm.parse_choice(prediction, ["respiration", "photosynthesis", "digestion", "solar cell"]) == expected


def test_choice_accuracy_maps_numeric_labels() -> None:
    choices = ["a", "b", "c", "d"]
    assert qm.choice_accuracy("B", "2", choices) == 1.0
    assert qm.choice_accuracy("B", "B", choices) == 1.0
    assert qm.choice_accuracy("C", "2", choices) == 0.0


@pytest.mark.parametrize(
    "prediction, expected",
    [("true", "true"), ("False.", "false"), ("SUPPORTS", "true"), ("REFUTES", "false"), ("It is correct", "true"),
     ("maybe", None)],
)
def test_claim_label(prediction: str, expected: str | None) -> None:
    assert qm.claim_label(prediction) == expected


def test_str_em_counts_sub_questions() -> None:
    groups = [["1999", "nineteen ninety-nine"], ["Paris"], ["Lyon"]]
    assert qm.str_em("It opened in 1999 in Paris.", groups) == pytest.approx(2 / 3)
    assert qm.str_em("nothing", []) == 0.0


def test_wilson_interval_by_hand() -> None:
    low, high = wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    m_low, m_high = mean_interval([0.0, 1.0, 0.5, 0.5])
    assert (m_low + m_high) / 2 == pytest.approx(0.5)


def test_aggregate_uses_wilson_for_binary_metrics() -> None:
    rows = [{"metrics": {"em": float(i < 3), "f1": 0.5}} for i in range(10)]
    out = aggregate(rows, ["em", "f1"], binary=["em"])
    assert out["em"]["mean"] == pytest.approx(0.3) and out["em"]["n"] == 10
    assert out["em"]["ci95"] == pytest.approx(list(wilson_interval(3, 10)))
    assert out["f1"]["ci95"] == pytest.approx([0.5, 0.5])
