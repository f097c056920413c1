"""Self-RAG decoding end to end on a tiny random model with the reflection vocabulary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_jsonl
from ragkit.cli import app
from ragkit.archs.selfrag.decoding import SelfRagConfig, SelfRagDecoder, SelfRagQuestion
from ragkit.archs.selfrag.scoring import ScoringConfig, StepOutput
from ragkit.archs.selfrag.tokens import REFLECTION_TOKENS

PASSAGES = [{"id": f"p{i}", "title": t, "text": f"the {t} is a city in france"} for i, t in
            enumerate(["paris", "london", "rome"])]


def load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def questions(n: int = 3, fetched: list | None = None) -> list[SelfRagQuestion]:
    def fetch(i: int):
        def inner():
            if fetched is not None:
                fetched.append(i)
            return PASSAGES
        return inner
    words = ["who was the king of france", "the river in london", "music of the city"]
    return [SelfRagQuestion(str(i), words[i % 3], fetch(i)) for i in range(n)]


def decoder(path: Path, **kw) -> SelfRagDecoder:
    model, tok = load(path)
    cfg = {"ndocs": 3, "max_new_tokens": 6, "batch_size": 8, **kw}
    return SelfRagDecoder(model, tok, SelfRagConfig(**cfg))


def test_always_retrieve_scores_every_passage(tiny_selfrag_path: Path) -> None:
    rows = decoder(tiny_selfrag_path, mode="always_retrieve").short_form(questions())
    for row in rows:
        assert row["retrieved"] is True
        assert [c["passage"] for c in row["candidates"]] == [0, 1, 2]
        finals = [c["scores"]["final"] for c in row["candidates"]]
        assert all(math.isfinite(f) for f in finals)
        best = max(range(3), key=lambda i: finals[i])
        assert row["output"] == row["candidates"][best]["answer"]
        assert all(t not in row["output"] for t in REFLECTION_TOKENS)
        assert 0.0 <= row["candidates"][0]["scores"]["relevance"] <= 1.0


def test_no_retrieval_never_fetches_passages(tiny_selfrag_path: Path) -> None:
    fetched: list[int] = []
    rows = decoder(tiny_selfrag_path, mode="no_retrieval").short_form(questions(fetched=fetched))
    assert fetched == []
    assert all(r["retrieved"] is False and len(r["candidates"]) == 1 for r in rows)
    assert all(r["candidates"][0]["raw"] is not None and "scores" not in r["candidates"][0] for r in rows)


def test_adaptive_threshold_decides(tiny_selfrag_path: Path) -> None:
    fetched: list[int] = []
    always = decoder(tiny_selfrag_path, threshold=0.0).short_form(questions(fetched=fetched))
    assert all(r["retrieved"] for r in always) and sorted(fetched) == [0, 1, 2]
    probs = [r["retrieve_prob"] for r in always]
    assert all(0.0 < p < 1.0 for p in probs)
    never = decoder(tiny_selfrag_path, threshold=1.0).short_form(questions())
    assert not any(r["retrieved"] for r in never)
    middle = sorted(probs)[1]
    mixed = decoder(tiny_selfrag_path, threshold=middle).short_form(questions())
    assert [r["retrieved"] for r in mixed] == [p > middle for p in probs]


def test_batched_equals_one_at_a_time(tiny_selfrag_path: Path) -> None:
    batched = decoder(tiny_selfrag_path, mode="always_retrieve", batch_size=16)
    single = decoder(tiny_selfrag_path, mode="always_retrieve", batch_size=1)
    a, b = batched.short_form(questions()), single.short_form(questions())
    assert batched.calls == 1 and single.calls == 9
    for x, y in zip(a, b):
        assert x["output"] == y["output"]
        for cx, cy in zip(x["candidates"], y["candidates"]):
            assert cx["raw"] == cy["raw"]
            assert cx["scores"]["final"] == pytest.approx(cy["scores"]["final"], abs=1e-4)


def test_model_without_reflection_tokens_is_a_clear_error(tiny_lm_path: Path) -> None:
    from ragkit.errors import ResourceError

    model, tok = load(tiny_lm_path)
    with pytest.raises(ResourceError, match="no Self-RAG reflection tokens"):
        SelfRagDecoder(model, tok, SelfRagConfig())


def test_passages_without_text_are_rejected(tiny_selfrag_path: Path) -> None:
    from ragkit.errors import InputError

    q = SelfRagQuestion("q1", "the king", lambda: [{"title": "t", "text": "  "}])
    with pytest.raises(InputError, match="q1"):
        decoder(tiny_selfrag_path, mode="always_retrieve").short_form([q])


# -- long form: the tree search on scripted continuations ----------------------------------------
class Scripted(SelfRagDecoder):
    """Continuations chosen by the passage in the prompt, with fixed relevance, so the beam is predictable."""

    def __init__(self, path: Path, **kw) -> None:
        model, tok = load(path)
        super().__init__(model, tok, SelfRagConfig(ndocs=3, long_form=True, mode="always_retrieve",
                                                   scoring=ScoringConfig(use_seqscore=False), **kw))
        self.prompts: list[list[str]] = []

    def step(self, prompts, max_new_tokens, *, stop_at_retrieval=False):
        self.prompts.append(list(prompts))
        out = []
        rel, irr = self.ids.ids["[Relevant]"], self.ids.ids["[Irrelevant]"]
        for p in prompts:
            title = p.rsplit("<paragraph>", 1)[1].split("\n", 1)[0]
            depth = p.count("[Relevant]") + 1  # earlier segments stay in the prompt, their evidence does not
            relevance = {"paris": 0.9, "london": 0.5, "rome": 0.1}[title]
            more = "[Retrieval]" if depth < 3 else ""
            text = f"[Relevant]{title} {depth}.{more}"
            out.append(StepOutput(text, [rel], [{rel: math.log(relevance), irr: math.log(1 - relevance)}], 0.0))
        return out


def test_long_form_beam_search_keeps_the_best_path(tiny_selfrag_path: Path) -> None:
    dec = Scripted(tiny_selfrag_path, beam_width=2, max_depth=4)
    row = dec.long_form(SelfRagQuestion("q", "tell me about cities", lambda: PASSAGES))
    # level 1: 3 children of the root; levels 2 and 3: 2 kept nodes x 3 passages each
    assert [len(p) for p in dec.prompts] == [3, 6, 6]
    assert [s["passage"] for s in row["segments"]] == [0, 0, 0]
    assert row["output"] == "paris 1. paris 2. paris 3."
    assert row["segments"][-1]["score"] == pytest.approx(0.9 ** 3)
    # each level's prompt carries the previous segments
    assert "paris 1." in dec.prompts[1][0] and "[Retrieval]<paragraph>paris" in dec.prompts[1][0]


def test_long_form_stops_when_no_segment_asks_for_retrieval(tiny_selfrag_path: Path) -> None:
    dec = Scripted(tiny_selfrag_path, beam_width=2, max_depth=8)
    row = dec.long_form(SelfRagQuestion("q", "tell me", lambda: PASSAGES))
    assert len(dec.prompts) == 3 and len(row["segments"]) == 3


# -- the CLI --------------------------------------------------------------------------------------
def test_generate_and_eval_selfrag_cli(tiny_selfrag_path: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "popqa.jsonl", [
        {"id": "a", "question": "who was the king", "answers": ["king"], "ctxs": PASSAGES},
        {"id": "b", "question": "the river", "answers": ["river"], "ctxs": PASSAGES[:2]},
    ])
    runner = CliRunner()
    result = runner.invoke(app, ["generate", str(data), "-m", str(tiny_selfrag_path), "--arch", "selfrag",
                                 "--mode", "always_retrieve", "--k", "2", "--max-new-tokens", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    assert all(len(r["candidates"]) == 2 and r["retrieved"] for r in rows)
    scored = runner.invoke(app, ["eval", "--task", "popqa", "--data", str(data), "--json"], input=result.stdout)
    assert scored.exit_code == 0, scored.stderr
    assert json.loads(scored.stdout)["metrics"]["match"]["n"] == 2
    report = tmp_path / "r.json"
    direct = runner.invoke(app, ["eval", "--task", "popqa", "--data", str(data), "-m", str(tiny_selfrag_path),
                                 "--arch", "selfrag", "--mode", "no_retrieval", "--max-new-tokens", "4",
                                 "--device", "cpu", "-o", str(report)])
    assert direct.exit_code == 0, direct.stderr
    saved = json.loads(report.read_text())
    assert saved["config"]["arch"] == "selfrag" and saved["config"]["options"]["mode"] == "no_retrieval"
    assert saved["metrics"]["retrieved"]["mean"] == 0.0


def test_selfrag_refuses_sampling_options_it_would_ignore(tiny_selfrag_path: Path) -> None:
    for extra in (["--do-sample"], ["--top-k", "5"], ["--stop", "END"]):
        result = CliRunner().invoke(app, ["generate", "-m", str(tiny_selfrag_path), "--arch", "selfrag", "--device", "cpu",
                                          *extra], input="who was the king\n")
        assert result.exit_code == 2 and extra[0] in result.stderr and "not used by --arch selfrag" in result.stderr


def test_generate_selfrag_with_plain_model_exits_4(tiny_lm_path: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["generate", "-m", str(tiny_lm_path), "--arch", "selfrag", "--device", "cpu"],
                                input="who was the king\n")
    assert result.exit_code == 4
    assert "reflection tokens" in result.stderr


def test_vllm_completion_maps_to_the_same_scores() -> None:
    """vLLM returns top-k Logprob objects per position; the mapping must feed the same scoring."""
    from types import SimpleNamespace

    from ragkit.archs.selfrag.decoding import vllm_step_output
    from ragkit.archs.selfrag.scoring import score_candidate
    from ragkit.archs.selfrag.tokens import ReflectionIds

    ids = ReflectionIds({t: i for i, t in enumerate(REFLECTION_TOKENS)})
    rel, irr, full = ids.ids["[Relevant]"], ids.ids["[Irrelevant]"], ids.ids["[Fully supported]"]
    lp = SimpleNamespace
    completion = SimpleNamespace(
        text="[Relevant]paris[Fully supported]</s>", token_ids=[rel, 99, full, 100], cumulative_logprob=-1.2,
        logprobs=[{rel: lp(logprob=math.log(0.6)), irr: lp(logprob=math.log(0.2))}, {99: lp(logprob=-0.1)},
                  {full: lp(logprob=math.log(0.5))}, {100: lp(logprob=-0.1)}])
    step = vllm_step_output(completion, "</s>")
    assert step.text == "[Relevant]paris[Fully supported]"
    s = score_candidate(step, ids, ScoringConfig(use_seqscore=False, use_utility=False))
    assert s.relevance == pytest.approx(0.75)
    # partial and no-support are outside the returned top-k: log-prob -100, as the reference counts them
    assert s.support == pytest.approx(1.0)
