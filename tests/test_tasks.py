"""Task loaders on the real shared files and on rows written in each released format; their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragkit.errors import InputError, UsageError
from ragkit.eval.tasks import get_task, load_examples

from conftest import SHARED_DATA, write_jsonl

needs_data = pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data is not beside the repository")


@needs_data
def test_popqa_w_gs_rows() -> None:
    examples = load_examples(get_task("popqa"), SHARED_DATA / "popqa" / "popqa_longtail_w_gs.first100.jsonl")
    assert len(examples) == 100
    first = examples[0]
    assert (first.id, first.question) == ("4382392", "What is Henry Feilden's occupation?")
    assert "politician" in first.golds and len(first.ctxs) == 25


@needs_data
def test_nq_open_rows_get_line_ids() -> None:
    examples = load_examples(get_task("nq"), SHARED_DATA / "nq_open" / "NQ-open.dev.jsonl", limit=3)
    assert [e.id for e in examples] == ["1", "2", "3"] and all(e.golds for e in examples)


@needs_data
def test_arc_both_layouts_agree_on_the_gold_letter() -> None:
    processed = load_examples(get_task("arc_c"), SHARED_DATA / "arc_challenge" / "arc_challenge_processed.first100.jsonl")
    foundry = load_examples(get_task("arc_c"), SHARED_DATA / "arc_challenge" / "arc_challenge_test.jsonl", limit=100)
    assert len(processed) == 100 and len(processed[0].ctxs) == 20
    assert processed[0].question.startswith("Given four answer candidates, A, B, C and D, choose the best answer choice.\n\n### Input:\n")
    assert "\nA: " in processed[0].question and "\nD: " in processed[0].question
    agree = [p.extra["answer_key"].replace("1", "A").replace("2", "B").replace("3", "C").replace("4", "D")
             == f.extra["answer_key"] for p, f in zip(processed, foundry)]
    assert sum(agree) == 99  # the data README's caveat: one NYSED item (line 45) is off by one in llm-foundry
    assert not agree[44]


@needs_data
def test_scifact_claims_keep_only_support_and_contradict() -> None:
    examples = load_examples(get_task("scifact"), SHARED_DATA / "scifact_claims" / "claims_dev.jsonl")
    labels = [e.extra["label"] for e in examples]
    assert labels.count("true") == 124 and labels.count("false") == 64 and len(examples) <= 188


def test_pubhealth_released_format(tmp_path: Path) -> None:
    rows = [
        {"id": "h1", "question": "Vitamin C cures the common cold.", "answers": ["REFUTES"], "ctxs": [{"title": "t", "text": "x"}]},
        {"id": "h2", "question": "Handwashing reduces infections.", "answers": ["SUPPORTS"], "ctxs": []},
    ]
    examples = load_examples(get_task("pubhealth"), write_jsonl(tmp_path / "health.jsonl", rows))
    assert [e.golds for e in examples] == [["false"], ["true"]]
    assert examples[0].question.endswith("## Input:\n\nVitamin C cures the common cold.")
    task = get_task("pubhealth")
    assert task.score(examples[0], "false")["accuracy"] == 1.0
    assert task.score(examples[1], "REFUTES")["accuracy"] == 0.0
    assert task.score(examples[1], "SUPPORTS")["match"] == 1.0


def test_fever_is_the_self_rag_scripts_name_for_pubhealth(tmp_path: Path) -> None:
    from ragkit.archs.selfrag.inference import SelfRagOptions

    rows = [{"id": "h1", "question": "Vitamin C cures the common cold.", "answers": ["REFUTES"]}]
    path = write_jsonl(tmp_path / "health.jsonl", rows)
    fever, pubhealth = load_examples(get_task("fever"), path), load_examples(get_task("pubhealth"), path)
    assert [(e.question, e.golds) for e in fever] == [(e.question, e.golds) for e in pubhealth]
    assert get_task("fever").score(fever[0], "false")["accuracy"] == 1.0
    assert SelfRagOptions(task="fever").decoding().closed  # scored per distinct answer, as pubhealth


def test_asqa_alce_format(tmp_path: Path) -> None:
    data = [{"sample_id": "-1", "question": "Who won?", "qa_pairs": [{"short_answers": ["Ann"]}, {"short_answers": ["Bob", "Robert"]}],
             "annotations": [{"long_answer": "Ann won in 1990 and Robert won in 1991."}], "docs": [{"title": "T", "text": "x"}]}]
    path = tmp_path / "asqa.json"
    path.write_text(json.dumps(data))
    [example] = load_examples(get_task("asqa"), path)
    scores = get_task("asqa").score(example, "Ann won in 1990; Robert won later.")
    assert scores["str_em"] == 1.0 and 0.3 < scores["rougeLsum"] < 1.0


@pytest.mark.parametrize(
    "task, row, message",
    [
        ("popqa", {"id": 1, "answers": ["x"]}, "field 'question' is missing"),
        ("popqa", {"id": 1, "question": "q"}, "field 'answers' is missing"),
        ("popqa", {"id": 1, "question": "q", "answers": [1]}, "field 'answers' must be"),
        ("arc_c", {"id": "a", "question": "q", "answerKey": "A"}, "field 'choices' is missing"),
        ("pubhealth", {"id": "a", "question": "q", "answers": ["MAYBE"]}, "expected SUPPORTS/REFUTES"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path: Path, task: str, row: dict, message: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": 0, "question": "ok", "answers": ["true"], "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "A"}, row])
    with pytest.raises(InputError) as err:
        load_examples(get_task(task), path)
    assert f"{path}:2:" in err.value.message and message in err.value.message


def test_unknown_task_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown task"):
        get_task("mmlu")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(InputError, match="empty input"):
        load_examples(get_task("qa"), tmp_path / "e.jsonl")


def test_free_text_bleu_and_rouge(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"id": "1", "question": "q", "answers": ["the cat sat on the mat"]}])
    [example] = load_examples(get_task("text"), path)
    same = get_task("text").score(example, "the cat sat on the mat")
    other = get_task("text").score(example, "a dog ran in the park")
    assert same["rougeL"] == pytest.approx(1.0) and same["bleu"] == pytest.approx(1.0)
    assert other["rougeL"] < 0.3 and other["bleu"] < 0.1
