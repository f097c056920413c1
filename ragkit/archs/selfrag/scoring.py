"""Critique scores of a Self-RAG continuation, by the paper's definitions or the reference code's.

Pure functions over what one generation step gives: the generated token ids and, at each position, the
log-probabilities of the reflection tokens. The same inputs come from transformers (full softmax) and vLLM
(top-k logprobs), so both backends share this module.

The paper (Asai et al. 2023, Sec. 3.3) normalises each group's token probabilities. The reference scripts
(AkariAsai/self-rag at HEAD 1fcdc42) differ in ways that change results; `compat_upstream=True` reproduces
them exactly (see docs/selfrag.md):
  * short form, adaptive retrieval: the ratio is taken on raw log-probabilities, not probabilities;
  * short form: weights and switches come from the flags with run_short_form.py's argparse defaults
    (w_* = 1.0, every use_* off); long form: run_long_form_static.py's main() hard-codes 1.0 / 1.0 / 0.5
    and its beam search never adds the sequence score, so those flags are refused there;
  * long form: the utility token probabilities are read with the support-token ids, so utility is always 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ragkit.errors import UsageError

from ragkit.archs.selfrag.tokens import (
    CONTINUE,
    FULLY,
    ISREL_GROUP,
    ISSUP_GROUP,
    ISUSE_GROUP,
    NO_RETRIEVAL,
    PARTIALLY,
    RELEVANT,
    RETRIEVAL,
    UTILITY_WEIGHTS,
    ReflectionIds,
)

MISSING_LOGPROB = -100.0  # a token outside the returned top-k (vLLM) counts as log-probability -100


@dataclass
class StepOutput:
    """One greedy continuation: text with reflection tokens kept, and the log-probs needed to score it."""

    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]]  # per generated position: token id -> log-probability (reflection ids at least)
    cumulative_logprob: float
    plain_text: str = ""  # compat_upstream: the text as vLLM's default decode gives it (upstream.vllm_plain_text)


@dataclass(frozen=True)
class Weights:
    """The weights and switches one scoring run uses, every one decided."""

    w_rel: float
    w_sup: float
    w_use: float
    use_groundness: bool
    use_utility: bool
    use_seqscore: bool


# the paper's weights (Sec. 3.3 / its Table 6 setting) with every score on, as the reference README's commands ask
PAPER = Weights(1.0, 1.0, 0.5, use_groundness=True, use_utility=True, use_seqscore=True)
# run_short_form.py at HEAD 1fcdc42: argparse defaults (--w_rel/--w_sup/--w_use 1.0, lines 281-286; the
# store_true switches --use_seqscore/--use_groundness/--use_utility off, lines 272-276), all passed on (315-316)
SHORT_FORM_HEAD = Weights(1.0, 1.0, 1.0, use_groundness=False, use_utility=False, use_seqscore=False)
# run_long_form_static.py at HEAD: main() passes w_rel=1.0, w_sup=1.0, w_use=0.5 whatever the flags (line 364)
# and the beam search calls the step scorer without use_seqscore (line 224); --use_grounding/--use_utility
# are store_true (off unless given)
LONG_FORM_HEAD = Weights(1.0, 1.0, 0.5, use_groundness=False, use_utility=False, use_seqscore=False)
LONG_FORM_FIXED = ("w_rel", "w_sup", "w_use", "use_seqscore")  # what the reference long form ignores


@dataclass
class ScoringConfig:
    """None: the default of the rules in force, the paper's (PAPER) or, with compat_upstream, the reference
    script's (SHORT_FORM_HEAD / LONG_FORM_HEAD). A value given is used, except where the reference long form
    ignores it: there it is refused rather than dropped."""

    w_rel: float | None = None
    w_sup: float | None = None
    w_use: float | None = None
    use_groundness: bool | None = None
    use_utility: bool | None = None
    use_seqscore: bool | None = None
    compat_upstream: bool = False

    def weights(self, *, long_form: bool = False) -> Weights:
        given = {name: getattr(self, name) for name in Weights.__dataclass_fields__ if getattr(self, name) is not None}
        if not self.compat_upstream:
            return dataclasses.replace(PAPER, **given)
        if long_form:
            ignored = [name for name in LONG_FORM_FIXED if name in given]
            if ignored:
                raise UsageError(f"{', '.join(ignored)}: the reference long form (run_long_form_static.py) ignores "
                                 "them, so compat_upstream cannot honour them",
                                 hint="Leave them out, or drop compat_upstream to use them.")
            return dataclasses.replace(LONG_FORM_HEAD, **given)
        return dataclasses.replace(SHORT_FORM_HEAD, **given)


@dataclass
class CandidateScore:
    final: float
    relevance: float
    support: float
    utility: float
    sequence: float  # mean log-probability per generated token
    groups: dict[str, dict[str, float]] = field(default_factory=dict)  # the probabilities each score came from

    def to_json(self) -> dict[str, object]:
        return {"final": self.final, "relevance": self.relevance, "support": self.support, "utility": self.utility,
                "sequence": self.sequence, "groups": self.groups}


def _lp(position: dict[int, float], token_id: int) -> float:
    return position.get(token_id, MISSING_LOGPROB)


def retrieve_probability(first: dict[int, float], ids: ReflectionIds, *, compat_upstream: bool = False) -> float:
    """P([Retrieval]) / (P([Retrieval]) + P([No Retrieval])) at the first generated position.

    compat_upstream: the reference computes this ratio on the log-probabilities themselves. Both are
    negative, so a confident [Retrieval] (log-prob near 0) gives a ratio near 0: the meaning inverts.
    """
    lp_ret, lp_no = _lp(first, ids.ids[RETRIEVAL]), _lp(first, ids.ids[NO_RETRIEVAL])
    if compat_upstream:
        total = lp_ret + lp_no
        return lp_ret / total if total != 0 else 0.0
    p_ret, p_no = math.exp(lp_ret), math.exp(lp_no)
    return p_ret / (p_ret + p_no) if p_ret + p_no > 0 else 0.0


def decide_retrieval(first: dict[int, float], text: str, ids: ReflectionIds, threshold: float | None, *,
                     compat_upstream: bool = False) -> tuple[bool, float | None]:
    """Adaptive retrieval: retrieve when the normalised [Retrieval] probability exceeds the threshold
    (or, without a threshold, when the model wrote [Retrieval]). Returns (decision, probability)."""
    if threshold is None:
        return RETRIEVAL in text, None
    prob = retrieve_probability(first, ids, compat_upstream=compat_upstream)
    return prob > threshold, prob


def _normalised(position: dict[int, float], group: dict[str, int]) -> dict[str, float]:
    probs = {name: math.exp(_lp(position, tid)) for name, tid in group.items()}
    total = sum(probs.values())
    return {name: (p / total if total > 0 else 0.0) for name, p in probs.items()}


def _first_position(token_ids: Sequence[int], group: dict[str, int]) -> int | None:
    wanted = set(group.values())
    return next((i for i, t in enumerate(token_ids) if t in wanted), None)


def score_candidate(step: StepOutput, ids: ReflectionIds, config: ScoringConfig, *,
                    long_form: bool = False) -> CandidateScore:
    """The critique score of one passage's continuation.

    relevance = P[Relevant] normalised over ISREL at the first generated position;
    support   = P[Fully] + 0.5 P[Partially], normalised over ISSUP, where the first ISSUP token was generated;
    utility   = sum_i w_i P[Utility:i], normalised over ISUSE, w = (-1, -0.5, 0, 0.5, 1), where the first
                ISUSE token was generated; support and utility are 0 when no such token was generated;
    final     = exp(mean token log-prob) [if use_seqscore] + w_rel relevance + w_sup support + w_use utility.
    """
    w = config.weights(long_form=long_form)
    groups: dict[str, dict[str, float]] = {}
    relevance = 0.0
    if step.logprobs:
        groups["isrel"] = _normalised(step.logprobs[0], ids.group(ISREL_GROUP))
        relevance = groups["isrel"][RELEVANT]
    support = 0.0
    if w.use_groundness:
        at = _first_position(step.token_ids, ids.group(ISSUP_GROUP))
        if at is not None:
            groups["issup"] = _normalised(step.logprobs[at], ids.group(ISSUP_GROUP))
            support = groups["issup"][FULLY] + 0.5 * groups["issup"][PARTIALLY]
    utility = 0.0
    if w.use_utility and not (long_form and config.compat_upstream):
        # (the reference long-form script reads utility with the support ids: 3 values != 5, so always 0)
        at = _first_position(step.token_ids, ids.group(ISUSE_GROUP))
        if at is not None:
            groups["isuse"] = _normalised(step.logprobs[at], ids.group(ISUSE_GROUP))
            utility = sum(w * groups["isuse"][name] for w, name in zip(UTILITY_WEIGHTS, ISUSE_GROUP))
    sequence = step.cumulative_logprob / max(len(step.token_ids), 1)
    final = w.w_rel * relevance + w.w_sup * support + w.w_use * utility + (math.exp(sequence) if w.use_seqscore else 0.0)
    return CandidateScore(final, relevance, support, utility, sequence, groups)


def continue_retrieving(position: dict[int, float], ids: ReflectionIds, threshold: float) -> bool:
    """Long form: a generated [No Retrieval] is rewritten to [Retrieval] when
    (P[Retrieval] + P[Continue]) / (P[Retrieval] + P[No Retrieval]) exceeds the threshold."""
    p = {name: math.exp(_lp(position, ids.ids[name])) for name in (RETRIEVAL, NO_RETRIEVAL, CONTINUE)}
    denominator = p[RETRIEVAL] + p[NO_RETRIEVAL]
    return denominator > 0 and (p[RETRIEVAL] + p[CONTINUE]) / denominator > threshold


def aggregate(answers: Sequence[str], scores: Sequence[float], *, closed: bool) -> int:
    """Index of the chosen candidate. Closed tasks (arc_c, pubhealth): the answer string with the largest
    summed score wins (its first candidate is returned); open tasks: the single best-scored candidate."""
    if not answers:
        raise ValueError("no candidates to choose from")
    if not closed:
        return max(range(len(scores)), key=lambda i: scores[i])
    totals: dict[str, float] = {}
    for a, s in zip(answers, scores):
        totals[a] = totals.get(a, 0.0) + s
    best = max(totals, key=lambda a: totals[a])
    return answers.index(best)
