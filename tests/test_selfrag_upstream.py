"""--compat-upstream against run_short_form.py / run_long_form_static.py at HEAD 1fcdc42 (AkariAsai/self-rag),
on synthetic continuations: the cases a small trained model never writes (docs/selfrag.md rows 2-4, 9-11)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragkit.archs.selfrag import upstream as reference
from ragkit.archs.selfrag.decoding import SelfRagConfig, SelfRagDecoder, SelfRagQuestion
from ragkit.archs.selfrag.scoring import (
    LONG_FORM_HEAD, PAPER, SHORT_FORM_HEAD, ScoringConfig, StepOutput, aggregate, score_candidate,
)
from ragkit.archs.selfrag.tokens import CONTINUE, REFLECTION_TOKENS, ReflectionIds, clean_answer
from ragkit.cli import app
from ragkit.errors import UsageError

IDS = ReflectionIds({t: i for i, t in enumerate(REFLECTION_TOKENS)})
I = IDS.ids
WORD, EOS = 100, 101


def metaspace_tokenizer():
    """A Llama-style (sentencepiece Metaspace) tokenizer with the reflection tokens added as special tokens,
    as the reference's fine-tuning adds them: decoding drops the first word's leading space, vLLM keeps it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "▁Response:", "▁the", "▁answer", "▁is", "▁politician", "\n", "▁A"]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.add_tokens(list(REFLECTION_TOKENS), special_tokens=True)
    return tok


def ids(tok, *tokens: str) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tokens]


# -- the text the reference reads (vLLM, skip_special_tokens=True) --------------------------------------------
def test_plain_text_is_vllms_continuation_without_special_tokens() -> None:
    tok = metaspace_tokenizer()
    prompt = ids(tok, "<s>", "▁the", "▁answer", "▁is", "[Retrieval]", "<paragraph>", "▁the", "</paragraph>")
    new = ids(tok, "[Relevant]", "▁politician", CONTINUE, "\n", "[Utility:5]", "</s>")
    assert tok.decode(new, skip_special_tokens=True) == "politician\n"  # a plain decode loses the space
    assert reference.vllm_plain_text(tok, prompt, new) == " politician\n"
    # ragkit's own cleaning of the same continuation, for contrast
    assert clean_answer(tok.decode(new[:-1], skip_special_tokens=False)) == "politician"
    assert reference.vllm_plain_text(tok, [], ids(tok, "▁A")) == "A"  # no prompt: nothing to continue


def test_open_task_answer_is_the_raw_text_closed_is_postprocessed() -> None:
    raw = " politician\n"
    assert reference.candidate_answer(raw, retrieved=True, closed=False) == " politician\n"
    assert reference.candidate_answer(raw, retrieved=True, closed=True) == " politician"
    assert reference.candidate_answer(raw, retrieved=False, closed=False) == " politician"
    # main(): one leading '#' or ':' dropped; the empty prediction the reference crashes on stays empty
    assert reference.candidate_answer(":A\n", retrieved=True, closed=True) == "A"
    assert reference.candidate_answer("##x", retrieved=True, closed=False) == "#x"
    assert reference.candidate_answer("", retrieved=True, closed=False) == ""
    # its control-token list leaves [Continue to Use Evidence] in (vLLM has removed it before it gets there)
    assert reference.postprocess_answer_option_conditioned(f"a{CONTINUE}[Relevant]</s>\n") == f"a{CONTINUE}"


def test_closed_grouping_on_the_references_postprocessing() -> None:
    texts, scores = [" A", "B", "A"], [0.5, 0.75, 0.45]
    assert reference.choose(texts, scores, closed=True) == 1  # ' A' 0.5 and 'A' 0.45 are two answers: B wins
    assert aggregate([clean_answer(t) for t in texts], scores, closed=True) == 0  # ragkit's cleaning: A 0.95
    assert reference.choose(["A\n", "B", "A"], scores, closed=True) == 0  # newlines do go: A 0.95, its first
    assert reference.choose(["x", "y"], [1.0, 1.0], closed=False) == 0  # ties: the first, as its stable sort


# -- weights and switches as HEAD takes them ----------------------------------------------------------------
def hand_step() -> StepOutput:
    def lp(**probs: float) -> dict[int, float]:
        return {I[name]: math.log(p) for name, p in probs.items()}

    return StepOutput("[Relevant]Paris[Fully supported][Utility:5]",
                      [I["[Relevant]"], WORD, I["[Fully supported]"], I["[Utility:5]"], EOS],
                      [lp(**{"[Relevant]": 0.3, "[Irrelevant]": 0.1}), {},
                       lp(**{"[Fully supported]": 0.2, "[Partially supported]": 0.2,
                             "[No support / Contradictory]": 0.1}),
                       lp(**{f"[Utility:{i}]": p for i, p in zip(range(1, 6), (0.1, 0.1, 0.1, 0.1, 0.6))}), {}],
                      -2.0)


RELEVANCE, SUPPORT, UTILITY, SEQ = 0.75, 0.6, 0.5, math.exp(-0.4)


def test_short_form_takes_the_flags_with_heads_defaults() -> None:
    assert ScoringConfig().weights() == PAPER
    assert ScoringConfig(compat_upstream=True).weights() == SHORT_FORM_HEAD
    plain = score_candidate(hand_step(), IDS, ScoringConfig(compat_upstream=True))
    assert plain.final == pytest.approx(RELEVANCE)  # no flags: support, utility, sequence score all off
    readme = ScoringConfig(compat_upstream=True, use_groundness=True, use_utility=True, use_seqscore=True)
    assert score_candidate(hand_step(), IDS, readme).final == pytest.approx(RELEVANCE + SUPPORT + 1.0 * UTILITY + SEQ)
    weighted = ScoringConfig(compat_upstream=True, w_rel=2.0, w_use=0.5, use_utility=True)
    assert score_candidate(hand_step(), IDS, weighted).final == pytest.approx(2 * RELEVANCE + 0.5 * UTILITY)
    paper = score_candidate(hand_step(), IDS, ScoringConfig())
    assert paper.final == pytest.approx(RELEVANCE + SUPPORT + 0.5 * UTILITY + SEQ)


def test_long_form_fixes_the_weights_and_refuses_what_it_would_ignore() -> None:
    assert ScoringConfig(compat_upstream=True).weights(long_form=True) == LONG_FORM_HEAD
    grounded = ScoringConfig(compat_upstream=True, use_groundness=True, use_utility=True)
    long = score_candidate(hand_step(), IDS, grounded, long_form=True)
    assert (long.utility, long.final) == (0.0, pytest.approx(RELEVANCE + SUPPORT))  # utility read with support ids
    for given in ({"w_rel": 2.0}, {"w_use": 0.5}, {"use_seqscore": True}):
        with pytest.raises(UsageError, match=next(iter(given))):
            ScoringConfig(compat_upstream=True, **given).weights(long_form=True)
        with pytest.raises(UsageError):
            SelfRagConfig(long_form=True, scoring=ScoringConfig(compat_upstream=True, **given)).validate()


def test_cli_refuses_ignored_long_form_flags_before_loading(tmp_path: Path) -> None:
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "q", "ctxs": [{"title": "t", "text": "x"}]}\n')
    result = CliRunner().invoke(app, ["generate", str(questions), "--arch", "selfrag", "-m", str(tmp_path / "absent"),
                                      "--compat-upstream", "--long-form", "--w-use", "0.5"])
    assert result.exit_code == 2, result.output
    assert "w_use" in result.output and "run_long_form_static.py" in result.output


# -- the decoder on scripted continuations ----------------------------------------------------------------
class Scripted(SelfRagDecoder):
    """Short form: each passage's continuation is scripted (the text with reflection tokens, the plain text vLLM
    would give, and its relevance), so answers and grouping are known."""

    def __init__(self, script: dict[str, tuple[str, float]], *, closed: bool, compat: bool = True) -> None:
        self.config = SelfRagConfig(mode="always_retrieve", ndocs=3, closed=closed,
                                    scoring=ScoringConfig(compat_upstream=compat))
        self.ids, self.script, self.calls, self.device = IDS, script, 0, "cpu"

    def step(self, prompts, max_new_tokens, *, stop_at_retrieval=False):
        out = []
        for p in prompts:
            plain, relevance = self.script[p.rsplit("<paragraph>", 1)[1].split("\n", 1)[0]]
            rel, irr = I["[Relevant]"], I["[Irrelevant]"]
            out.append(StepOutput(f"[Relevant]{plain}{CONTINUE}", [rel, WORD],
                                  [{rel: math.log(relevance), irr: math.log(1 - relevance)}, {}], 0.0,
                                  plain_text=plain if self.config.scoring.compat_upstream else ""))
        return out


PASSAGES = [{"title": t, "text": f"about {t}"} for t in ("p0", "p1", "p2")]


def answer(decoder: Scripted) -> dict:
    return decoder.short_form([SelfRagQuestion("q", "question", lambda: PASSAGES)])[0]


def test_compat_open_task_returns_the_raw_best_continuation() -> None:
    script = {"p0": (" politician\n", 0.9), "p1": ("actor", 0.5), "p2": ("#singer", 0.1)}
    row = answer(Scripted(script, closed=False))
    assert row["output"] == " politician\n" and row["candidates"][0]["answer"] == " politician\n"
    assert row["raw_output"] == f"[Relevant] politician\n{CONTINUE}"
    assert answer(Scripted(script, closed=False, compat=False))["output"] == "politician"


def test_compat_closed_task_groups_as_the_reference() -> None:
    # relevance is the whole score here (no flags): 0.5 / 0.75 / 0.45
    script = {"p0": (" A", 0.5), "p1": ("B", 0.75), "p2": ("A", 0.45)}
    assert answer(Scripted(script, closed=True))["output"] == "B"


def test_paper_mode_closed_task_groups_after_cleaning() -> None:
    script = {"p0": (" A", 0.5), "p1": ("B", 0.75), "p2": ("A", 0.45)}
    decoder = Scripted(script, closed=True, compat=False)
    decoder.config = SelfRagConfig(mode="always_retrieve", ndocs=3, closed=True,
                                   scoring=ScoringConfig(use_groundness=False, use_utility=False, use_seqscore=False))
    assert answer(decoder)["output"] == "A"


def test_transformers_decoder_fills_the_plain_text_only_in_compat(tiny_selfrag_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_selfrag_path), AutoTokenizer.from_pretrained(tiny_selfrag_path)
    question = SelfRagQuestion("q", "who was the king of france", lambda: [{"title": "paris", "text": "a city"}])
    for compat in (True, False):
        config = SelfRagConfig(mode="always_retrieve", ndocs=1, max_new_tokens=6,
                               scoring=ScoringConfig(compat_upstream=compat))
        decoder = SelfRagDecoder(model, tok, config)
        step = decoder.step([decoder.prompt(question) + "[Retrieval]<paragraph>paris\na city</paragraph>"], 6)[0]
        if compat:
            assert not any(t in step.plain_text for t in REFLECTION_TOKENS)
            special = set(tok.all_special_ids) | reference._added_special_ids(tok)
            words = [t for t in step.token_ids if t not in special]
            assert step.plain_text.split() == tok.decode(words, skip_special_tokens=True).split()
        else:
            assert step.plain_text == ""


# -- ARC: the reference shows four choices --------------------------------------------------------------------
def test_arc_five_choices_upstream_prompt_has_four_lines() -> None:
    from ragkit.errors import Location
    from ragkit.eval.tasks import load_arc
    from ragkit.io.queries import questions_from_examples

    row = {"id": "x", "question": "Which?", "answerKey": "E",
           "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["a", "b", "c", "d", "e"]}}
    example = load_arc(row, Location("arc.jsonl", 1))
    assert example.question.endswith("\nD: d\nE: e")
    assert example.upstream_text is not None and example.upstream_text.endswith("\nA: a\nB: b\nC: c\nD: d")
    numeric = dict(row, choices={"label": ["1", "2", "3", "4", "5"], "text": ["a", "b", "c", "d", "e"]})
    assert load_arc(numeric, Location("arc.jsonl", 2)).upstream_text == example.upstream_text
    four = dict(row, answerKey="A", choices={"label": ["A", "B", "C"], "text": ["a", "b", "c"]})
    assert load_arc(four, Location("arc.jsonl", 3)).upstream_text is None  # D shown empty, as the reference
    assert load_arc(four, Location("arc.jsonl", 3)).question.endswith("\nC: c\nD: ")
    assert questions_from_examples([example])[0].upstream_text == example.upstream_text


def test_selfrag_answerer_asks_with_the_upstream_prompt_only_in_compat() -> None:
    from ragkit.archs.selfrag.inference import SelfRagAnswerer, SelfRagOptions
    from ragkit.io.queries import Question

    class Recorder:
        device, config = "cpu", SelfRagConfig()

        def answer(self, questions):
            return [q.instruction for q in questions]

    question = Question("x", "five lines", [{"title": "t", "text": "x"}], {}, upstream_text="four lines")
    for compat, expected in ((True, "four lines"), (False, "five lines")):
        answerer = SelfRagAnswerer(Recorder(), SelfRagOptions(compat_upstream=compat), None)
        assert answerer.answer([question]) == [expected]
