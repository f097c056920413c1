"""`ragkit eval compare A B --paired`: the paired difference, its bootstrap interval, a permutation p-value that
matches the exact one, and refusals (ids differ, not two reports)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ragkit.cli import app
from ragkit.eval.paired import paired_test

runner = CliRunner()


def report(path: Path, values: dict[str, float], task: str = "popqa") -> Path:
    rows = [{"id": i, "metrics": {"match": v}} for i, v in values.items()]
    mean = sum(values.values()) / len(values)
    path.write_text(json.dumps({"task": task, "primary_metric": "match", "n": len(rows),
                                "metrics": {"match": {"mean": mean, "n": len(rows), "ci95": [0, 1]}}, "rows": rows}))
    return path


def test_the_permutation_p_value_matches_the_exact_one() -> None:
    a = {str(i): v for i, v in enumerate([0, 1, 0, 0, 1, 0, 0, 1, 0, 0])}
    b = {str(i): v for i, v in enumerate([1, 1, 1, 0, 1, 1, 0, 1, 1, 0])}
    result = paired_test(a, b, "match", where=("a", "b"), resamples=40_000)
    d = np.array([b[k] - a[k] for k in sorted(a)], dtype=float)
    exact = np.mean([abs((np.array(s) * d).mean()) >= abs(d.mean()) - 1e-12
                     for s in itertools.product((-1, 1), repeat=len(d))])
    assert result.difference == pytest.approx(0.4)
    assert result.p_value == pytest.approx(exact, abs=0.01)  # exact: over all 2^10 sign vectors
    assert result.ci95[0] <= result.difference <= result.ci95[1]


def test_identical_runs_differ_by_nothing_and_a_consistent_gain_is_significant() -> None:
    same = {str(i): float(i % 2) for i in range(30)}
    flat = paired_test(same, same, "match", where=("a", "b"))
    assert flat.difference == 0 and flat.p_value == 1.0 and flat.ci95 == (0.0, 0.0)
    better = paired_test(same, {k: 1.0 for k in same}, "match", where=("a", "b"))
    assert better.difference == pytest.approx(0.5) and better.p_value < 0.001 and better.ci95[0] > 0


def test_cli_paired_json_and_refusals(tmp_path: Path) -> None:
    a = report(tmp_path / "a.json", {"q1": 0, "q2": 0, "q3": 1, "q4": 0})
    b = report(tmp_path / "b.json", {"q1": 1, "q2": 1, "q3": 1, "q4": 0})
    result = runner.invoke(app, ["eval", "compare", str(a), str(b), "--paired", "--json"])
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["difference"] == pytest.approx(0.5) and out["n"] == 4 and 0 < out["p_value"] <= 1
    other = report(tmp_path / "c.json", {"q1": 1, "q2": 1, "q9": 1, "q4": 0})
    result = runner.invoke(app, ["eval", "compare", str(a), str(other), "--paired"])
    assert result.exit_code == 3 and "example 'q3' is only in this report" in result.stderr
    result = runner.invoke(app, ["eval", "compare", str(a), str(b), str(other), "--paired"])
    assert result.exit_code == 2 and "--paired compares two reports" in result.stderr
    result = runner.invoke(app, ["eval", "compare", str(a), str(b), "--paired", "--metric", "f1"])
    assert result.exit_code == 3 and "no 'f1'" in result.stderr
