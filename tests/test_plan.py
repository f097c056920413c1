"""`ragkit index plan` and `auto`: the build-time model, the time budget, and one story told three ways
(table, headline, advice, --json)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ragkit.cli import app
from ragkit.errors import UsageError
from ragkit.index.build_time import estimate_build_seconds, format_seconds, parse_duration, phases
from ragkit.index.plan import plan
from ragkit.index.spec import IndexSpec, choose_auto, format_bytes, parse_spec, resolve_spec

GIB = 2**30


@pytest.mark.parametrize("text", ["flat", "hnsw:M=32", "ivf-pq:m=96", "ivf-pq:m=96,hnsw=0", "ivf-pq:m=96,refine=100",
                                  "IVF1024,SQ8"])
def test_build_time_grows_with_the_corpus(text):
    spec = parse_spec(text)
    sizes = [10_000, 100_000, 1_000_000, 10_000_000, 21_000_000]
    times = [estimate_build_seconds(spec, n, 768) for n in sizes]
    assert times == sorted(times) and times[0] < times[-1]


def test_exact_assignment_grows_with_the_lists_and_the_graph_does_not():
    flat = [phases(IndexSpec("ivf-pq", {"nlist": nlist, "m": 96, "hnsw": 0}), 21_000_000, 768)["assign"]
            for nlist in (1024, 4096, 16384)]
    graph = [phases(IndexSpec("ivf-pq", {"nlist": nlist, "m": 96, "hnsw": 32}), 21_000_000, 768)["assign"]
             for nlist in (1024, 4096, 16384)]
    assert flat[0] < flat[1] < flat[2] and flat[2] == pytest.approx(16 * flat[0])
    assert graph[0] == graph[2] < flat[2]


def test_auto_honours_a_time_budget():
    n, dim, memory = 21_000_000, 768, 12 * GIB
    unbounded = choose_auto(n, dim, memory)
    need = estimate_build_seconds(unbounded.spec, n, dim)
    bounded = choose_auto(n, dim, memory, max_seconds=0.8 * need)
    assert estimate_build_seconds(bounded.spec, n, dim) <= 0.8 * need
    assert bounded.spec.params["nlist"] < unbounded.spec.params["nlist"]
    assert format_seconds(estimate_build_seconds(bounded.spec, n, dim)) in bounded.reason
    with pytest.raises(UsageError, match="no index that fits .* builds .* in time; the fastest, ivf-pq"):
        choose_auto(n, dim, memory, max_seconds=60)


def test_an_explicit_spec_over_the_time_budget_is_refused():
    with pytest.raises(UsageError, match="over max_build_time"):
        resolve_spec(parse_spec("hnsw"), 10_000_000, 768, None, max_seconds=600)
    spec, _ = resolve_spec(parse_spec("flat"), 1000, 8, None, max_seconds=600)
    assert spec.kind == "flat"


def test_table_headline_advice_and_json_agree():
    result = plan(21_000_000, 768, max_memory=20 * GIB)
    auto = result["auto"]
    rows = {row["spec"]: row for row in result["candidates"]}
    assert auto["spec"] in rows, "the headline's spec is one of the table's rows"
    row = rows[auto["spec"]]
    assert row["fits"] and auto["build_seconds"] == row["build_seconds"]
    advice = [line for line in result["advice"] if line.startswith("auto takes")]
    assert advice == [f"auto takes {auto['spec']} ({row['factory']}): {format_bytes(row['serve_bytes'])} to serve, "
                      f"{format_bytes(row['build_bytes'])} and ~{format_seconds(row['build_seconds'])} to build"]
    assert not any("most accurate" in line for line in result["advice"])
    spill = [line for line in result["advice"] if "spills" in line][0]
    assert format_bytes(result["build_spill_bytes"]) in spill and "float32" in spill


def test_cli_text_and_json_carry_the_same_numbers():
    runner = CliRunner()
    argv = ["index", "plan", "--passages", "21000000", "--dim", "768", "--max-memory", "20G", "--max-build-time", "3h"]
    as_json = json.loads(runner.invoke(app, [*argv, "--json"]).stdout)
    text = runner.invoke(app, argv, env={"COLUMNS": "200"}).output
    assert as_json["max_build_seconds"] == 3 * 3600
    assert f"auto: {as_json['auto']['spec']}" in text
    for row in as_json["candidates"]:
        line = next(line for line in text.splitlines() if f"│ {row['spec']} " in line)
        assert format_seconds(row["build_seconds"]) in line and format_bytes(row["serve_bytes"]) in line


def test_durations():
    assert parse_duration("90s") == 90 and parse_duration("45m") == 2700 and parse_duration("1.5h") == 5400
    assert parse_duration("600") == 600 and parse_duration(None) is None
    for bad in ("soon", "0", "-1h"):
        with pytest.raises(UsageError, match="max_build_time"):
            parse_duration(bad)


def test_build_refuses_a_spec_that_cannot_build_in_time(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"passage {i}"}) + "\n" for i in range(5)))
    result = CliRunner().invoke(app, ["index", "build", str(corpus), "-o", str(tmp_path / "i"), "--spec", "flat",
                                      "--max-build-time", "1s", "-m", "minilm"])
    assert result.exit_code == 2, result.output
    assert "over max_build_time" in result.output
    assert not (tmp_path / "i").exists() or not any((tmp_path / "i").glob("v*"))


def test_a_build_records_the_seconds_of_each_phase(tmp_path):
    """The build-time model is checked phase by phase against real builds (issue 26: the 21M estimate was
    31% low and nothing said which phase)."""
    import numpy as np

    from ragkit.index.encoder_info import EncoderInfo
    from ragkit.index.index import Index
    from ragkit.io.corpus import Passage

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 16)).astype(np.float32)
    index = Index.build(tmp_path / "i", [Passage(f"p{i}", f"text {i}", "") for i in range(3000)], vectors,
                        EncoderInfo("t", 16, False, None, "fp"), spec="ivf-pq:nlist=16,m=4,refine=10")
    phases = index.manifest["build_phases"]
    assert set(phases) == {"input", "store", "train", "fill", "write"}
    assert all(v >= 0 for v in phases.values()) and phases["train"] > 0  # (a fill of 3,000 rows rounds to 0.0 s)
    index.upsert([Passage("x", "x", "")], vectors[:1], index.encoder)
    assert Index.open(tmp_path / "i").manifest["build_phases"] == phases  # the build's record, kept
