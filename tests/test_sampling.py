"""Importance-sampled evaluation (`eval --sample N --stratify FIELD`): on the full PopQA set, a stratified
weighted sample's estimate is unbiased for the full-set number, its 95% interval covers it about 95% of the
time, and stratifying by popularity narrows it; the CLI wiring and its refusals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA, run_cli, write_jsonl
from ragkit.eval.sampling import draw, estimate
from ragkit.eval.tasks import get_task, load_examples

POPQA = SHARED_DATA / "popqa" / "popqa.jsonl"
pytestmark = pytest.mark.skipif(not POPQA.exists(), reason="../shared/data/popqa is not beside the repository")


def correct(example) -> bool:
    """A reader that knows popular entities: right 80% of the time when pop >= 1000, else 20% (fixed per id)."""
    roll = int(hashlib.sha256(example.id.encode()).hexdigest(), 16) % 100
    return roll < (80 if example.fields["pop"] >= 1000 else 20)


@pytest.fixture(scope="module")
def popqa():
    examples = load_examples(get_task("popqa"), POPQA)
    rows = [{"id": e.id, "metrics": {"match": float(correct(e))}} for e in examples]
    truth = sum(r["metrics"]["match"] for r in rows) / len(rows)
    return examples, {r["id"]: r for r in rows}, truth


def test_the_stratified_estimate_is_unbiased_and_its_interval_covers_the_full_set(popqa) -> None:
    examples, by_id, truth = popqa
    assert len(examples) == 14_267
    results = {}
    for field in ("pop", None):
        estimates, covered, widths = [], 0, []
        for seed in range(40):
            sample = draw(examples, 400, field=field, bins=5, seed=seed)
            assert len(sample.examples) == 400 and sample.population == 14_267
            got = estimate([by_id[e.id] for e in sample.examples], sample, ["match"])["match"]
            estimates.append(got["mean"])
            covered += got["ci95"][0] <= truth <= got["ci95"][1]
            widths.append(got["ci95"][1] - got["ci95"][0])
        results[field] = (sum(estimates) / len(estimates), covered, sum(widths) / len(widths))
    for field, (mean, covered, _) in results.items():
        assert mean == pytest.approx(truth, abs=0.01), (field, mean, truth)
        assert covered >= 34, (field, covered)  # 95% nominal: 38 of 40 expected
    assert results["pop"][2] < 0.85 * results[None][2], results  # popularity predicts the metric: narrower


def test_weights_and_strata_follow_the_population(popqa) -> None:
    examples, _, _ = popqa
    sample = draw(examples, 500, field="pop", bins=5, seed=3)
    assert sum(big for big, _ in sample.strata.values()) == 14_267
    assert sum(small for _, small in sample.strata.values()) == 500
    assert sum(sample.weight(e.id) for e in sample.examples) == pytest.approx(14_267)
    for big, small in sample.strata.values():  # proportional allocation, within one example
        assert abs(small - 500 * big / 14_267) <= 1
    again = draw(examples, 500, field="pop", bins=5, seed=3)
    assert [e.id for e in again.examples] == [e.id for e in sample.examples]  # the seed decides


def test_eval_sample_on_the_cli(popqa, tmp_path: Path) -> None:
    examples, _, _ = popqa
    preds = write_jsonl(tmp_path / "preds.jsonl", [
        {"id": e.id, "output": e.golds[0] if correct(e) else "I do not know"} for e in examples])
    full = run_cli("eval", "--task", "popqa", "--data", POPQA, "--predictions", preds, "--json")
    assert full.exit_code == 0, full.stderr
    truth = json.loads(full.stdout)["metrics"]["match"]["mean"]  # the full set's number, as ragkit scores it
    out = tmp_path / "report.json"
    sampled = run_cli("eval", "--task", "popqa", "--data", POPQA, "--predictions", preds, "--sample", 600,
                      "--stratify", "pop", "--sample-seed", 7, "-o", out, "--json")
    assert sampled.exit_code == 0, sampled.stderr
    report = json.loads(out.read_text())
    match = report["metrics"]["match"]
    assert report["n"] == 600 and report["sampling"]["population"] == 14_267 and report["sampling"]["field"] == "pop"
    assert abs(match["mean"] - truth) < 3 * match["se"] and match["estimate_of"] == 14_267
    assert sum(r["weight"] for r in report["rows"]) == pytest.approx(14_267)
    # only the sampled examples need predictions
    sampled_ids = {r["id"] for r in report["rows"]}
    partial = write_jsonl(tmp_path / "partial.jsonl", [json.loads(line) for line in preds.read_text().splitlines()
                                                        if json.loads(line)["id"] in sampled_ids])
    again = run_cli("eval", "--task", "popqa", "--data", POPQA, "--predictions", partial, "--sample", 600,
                    "--stratify", "pop", "--sample-seed", 7, "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["metrics"]["match"] == match


def test_sampling_refusals(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", [{"id": str(i), "question": "q", "answers": ["a"]} for i in range(20)])
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": str(i), "output": "a"} for i in range(10)])
    cases = [
        (["--stratify", "pop"], 2, "give --sample N too"),
        (["--sample", 5, "--stratify", "pop"], 3, "field 'pop' (--stratify) is missing"),
        (["--sample", 15], 2, "has no prediction"),  # 10 of 20 predicted: a sample would have holes
    ]
    for extra, code, message in cases:
        result = run_cli("eval", "--task", "qa", "--data", data, "--predictions", preds, *extra)
        assert result.exit_code == code and message in result.stderr, (extra, result.stderr)
    beir = run_cli("eval", "--task", "beir", "--data", tmp_path, "--sample", 5)
    assert beir.exit_code == 2 and "--sample: not used by --task beir" in beir.stderr
