"""Self-RAG critique scores against hand-computed probabilities, by the paper's and the reference's rules."""

from __future__ import annotations

import math

import pytest

from ragkit.archs.selfrag.scoring import (
    ScoringConfig, StepOutput, aggregate, continue_retrieving, decide_retrieval, retrieve_probability,
    score_candidate,
)
from ragkit.archs.selfrag.tokens import REFLECTION_TOKENS, ReflectionIds, clean_answer

IDS = ReflectionIds({t: i for i, t in enumerate(REFLECTION_TOKENS)})
I = IDS.ids
WORD, EOS = 100, 101
log = math.log


def position(**probs: float) -> dict[int, float]:
    names = {"ret": "[Retrieval]", "noret": "[No Retrieval]", "cont": "[Continue to Use Evidence]",
             "rel": "[Relevant]", "irr": "[Irrelevant]", "full": "[Fully supported]",
             "part": "[Partially supported]", "nosup": "[No support / Contradictory]"}
    out = {}
    for key, p in probs.items():
        token = names.get(key) or f"[Utility:{key[1:]}]"
        out[I[token]] = log(p)
    return out


def hand_step() -> StepOutput:
    """[Relevant] Paris [Fully supported] [Utility:5] </s>, with known group probabilities."""
    return StepOutput(
        text="[Relevant]Paris[Fully supported][Utility:5]",
        token_ids=[I["[Relevant]"], WORD, I["[Fully supported]"], I["[Utility:5]"], EOS],
        logprobs=[position(rel=0.3, irr=0.1), {}, position(full=0.2, part=0.2, nosup=0.1),
                  position(u1=0.1, u2=0.1, u3=0.1, u4=0.1, u5=0.6), {}],
        cumulative_logprob=-2.0,
    )


def test_retrieve_probability_paper_normalises_probabilities() -> None:
    first = position(ret=0.6, noret=0.2)
    assert retrieve_probability(first, IDS) == pytest.approx(0.75)
    assert decide_retrieval(first, "", IDS, 0.5) == (True, pytest.approx(0.75))
    assert decide_retrieval(first, "", IDS, 0.8)[0] is False


def test_retrieve_probability_upstream_uses_raw_logprobs_and_inverts() -> None:
    first = position(ret=0.6, noret=0.2)
    assert retrieve_probability(first, IDS, compat_upstream=True) == pytest.approx(log(0.6) / (log(0.6) + log(0.2)))
    # a confident [Retrieval] gives a tiny ratio on log-probs: the reference then does NOT retrieve
    confident = position(ret=0.99, noret=0.01)
    assert decide_retrieval(confident, "", IDS, 0.2)[0] is True
    assert decide_retrieval(confident, "", IDS, 0.2, compat_upstream=True)[0] is False


def test_decision_without_threshold_reads_the_generated_token() -> None:
    assert decide_retrieval({}, "[Retrieval]<paragraph>", IDS, None) == (True, None)
    assert decide_retrieval({}, "[No Retrieval]Paris", IDS, None) == (False, None)


def test_missing_token_counts_as_logprob_minus_100() -> None:
    only_ret = {I["[Retrieval]"]: log(0.5)}
    assert retrieve_probability(only_ret, IDS) == pytest.approx(0.5 / (0.5 + math.exp(-100)))


def test_candidate_score_paper_definition() -> None:
    s = score_candidate(hand_step(), IDS, ScoringConfig(w_rel=1.0, w_sup=1.0, w_use=0.5))
    assert s.relevance == pytest.approx(0.75)  # 0.3 / (0.3 + 0.1)
    assert s.support == pytest.approx(0.4 + 0.5 * 0.4)  # (0.2 + 0.5*0.2) / 0.5
    assert s.utility == pytest.approx(-0.1 - 0.05 + 0 + 0.05 + 0.6)
    assert s.sequence == pytest.approx(-0.4)
    assert s.final == pytest.approx(0.75 + 0.6 + 0.5 * 0.5 + math.exp(-0.4))
    weighted = score_candidate(hand_step(), IDS, ScoringConfig(w_rel=2.0, w_sup=0.0, w_use=1.0, use_seqscore=False))
    assert weighted.final == pytest.approx(2 * 0.75 + 0.5)


def test_long_form_utility_paper_and_upstream() -> None:
    """(compat weights and switches: tests/test_selfrag_upstream.py)"""
    upstream = ScoringConfig(compat_upstream=True, use_groundness=True, use_utility=True)
    assert score_candidate(hand_step(), IDS, upstream, long_form=True).utility == 0.0  # read with the support ids
    paper_long = score_candidate(hand_step(), IDS, ScoringConfig(use_seqscore=False), long_form=True)
    assert paper_long.utility == pytest.approx(0.5)


def test_support_and_utility_are_zero_when_not_generated_or_disabled() -> None:
    step = StepOutput("[Irrelevant]Paris", [I["[Irrelevant]"], WORD, EOS],
                      [position(rel=0.1, irr=0.3), {}, {}], -1.0)
    s = score_candidate(step, IDS, ScoringConfig(use_seqscore=False))
    assert (s.relevance, s.support, s.utility) == (pytest.approx(0.25), 0.0, 0.0)
    off = score_candidate(hand_step(), IDS, ScoringConfig(use_groundness=False, use_utility=False, use_seqscore=False))
    assert (off.support, off.utility, off.final) == (0.0, 0.0, pytest.approx(0.75))


def test_support_is_read_at_the_first_support_token() -> None:
    step = hand_step()
    step.token_ids.insert(1, I["[Partially supported]"])
    step.logprobs.insert(1, position(full=0.1, part=0.1, nosup=0.8))
    s = score_candidate(step, IDS, ScoringConfig())
    assert s.support == pytest.approx(0.1 + 0.5 * 0.1)


def test_aggregation_closed_sums_per_answer_open_takes_best() -> None:
    answers, scores = ["A", "B", "A"], [1.0, 1.5, 0.6]
    assert aggregate(answers, scores, closed=True) == 0  # A: 1.6 > B: 1.5
    assert aggregate(answers, scores, closed=False) == 1
    assert aggregate(["x", "y"], [1.0, 1.0], closed=False) == 0  # ties: the first, like a stable sort


def test_continue_retrieving_long_form_rule() -> None:
    assert continue_retrieving(position(ret=0.2, noret=0.5, cont=0.2), IDS, 0.5) is True  # 0.4/0.7
    assert continue_retrieving(position(ret=0.1, noret=0.8, cont=0.05), IDS, 0.2) is False  # 0.15/0.9


def test_clean_answer_strips_reflection_tokens() -> None:
    raw = "[Relevant]Paris is the capital.[Fully supported][Utility:5]</s>"
    assert clean_answer(raw) == "Paris is the capital."
    assert clean_answer(":[Continue to Use Evidence] yes") == "yes"
    assert clean_answer("[Continue to Use Evidence] yes", upstream=True) == "[Continue to Use Evidence] yes"
