"""`eval --task factscore`: Self-RAG's biography rows in, FActScore's input file out, FActScore's own scorer
run when it can be (the package, its knowledge source, its model's key), and a plain "not scored" otherwise."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import pytest

from conftest import run_cli, write_jsonl

ROWS = [{"input": "Question: Tell me a bio of Ada Lovelace.", "topic": "Ada Lovelace", "cat": ["rare"],
         "ctxs": [{"title": "Ada Lovelace", "text": "Ada Lovelace was an English mathematician."}]},
        {"input": "Question: Tell me a bio of Alan Turing.", "topic": "Alan Turing", "cat": ["frequent"]}]


def _files(tmp_path: Path) -> tuple[Path, Path]:
    data = write_jsonl(tmp_path / "factscore.jsonl", ROWS)
    preds = write_jsonl(tmp_path / "preds.jsonl", [{"id": "1", "output": "Ada Lovelace was a mathematician."},
                                                   {"id": "2", "output": "Alan Turing was a computer scientist."}])
    return data, preds


def test_the_generations_are_written_for_factscore_and_no_score_is_invented(tmp_path: Path) -> None:
    data, preds = _files(tmp_path)
    result = run_cli("eval", "--task", "factscore", "--data", data, "--predictions", preds, "-o", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in (tmp_path / "r.factscore.jsonl").read_text().splitlines()]
    assert lines == [{"topic": "Ada Lovelace", "output": "Ada Lovelace was a mathematician.",
                      "input": ROWS[0]["input"], "cat": ["rare"]},
                     {"topic": "Alan Turing", "output": "Alan Turing was a computer scientist.",
                      "input": ROWS[1]["input"], "cat": ["frequent"]}]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["metrics"] == {} and report["factscore"]["scored"] is False
    assert "factscore package is not installed" in report["factscore"]["reason"]
    assert "not scored" in result.stderr


def test_factscores_own_scorer_is_called_when_it_can_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The call contract, with a stand-in `factscore` package (the real one needs OpenAI and a Wikipedia DB)."""
    calls = {}

    class FactScorer:
        def __init__(self, **kwargs):
            calls["init"] = kwargs

        def register_knowledge_source(self, name, db_path):
            calls["source"] = (name, db_path)

        def get_score(self, topics, generations, knowledge_source):
            calls["score"] = (topics, generations, knowledge_source)
            return {"score": 0.625, "respond_ratio": 1.0, "num_facts_per_response": 4.0}

    package = types.ModuleType("factscore")
    package.__spec__ = importlib.machinery.ModuleSpec("factscore", None)
    module = types.ModuleType("factscore.factscorer")
    module.FactScorer = FactScorer
    monkeypatch.setitem(sys.modules, "factscore", package)
    monkeypatch.setitem(sys.modules, "factscore.factscorer", module)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    db = tmp_path / "enwiki-20230401.db"
    db.write_bytes(b"")
    data, preds = _files(tmp_path)
    result = run_cli("eval", "--task", "factscore", "--data", data, "--predictions", preds, "--factscore-db", db,
                     "--factscore-out", tmp_path / "gen.jsonl", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["metrics"]["factscore"]["mean"] == 0.625 and report["factscore"]["scored"] is True
    assert calls["score"] == (["Ada Lovelace", "Alan Turing"],
                              ["Ada Lovelace was a mathematician.", "Alan Turing was a computer scientist."], "ragkit")
    assert calls["source"] == ("ragkit", str(db)) and calls["init"]["model_name"] == "retrieval+ChatGPT"


def test_factscore_options_and_long_form(tmp_path: Path) -> None:
    from ragkit.archs.selfrag.inference import SelfRagOptions

    assert SelfRagOptions(task="factscore").decoding().long_form  # the segment beam search, as the seed runs it
    data, preds = _files(tmp_path)
    nowhere = run_cli("eval", "--task", "factscore", "--data", data, "--predictions", preds)
    assert nowhere.exit_code == 2 and "--factscore-out" in nowhere.stderr
    other = run_cli("eval", "--task", "qa", "--data", data, "--predictions", preds, "--factscore-db", "x.db")
    assert other.exit_code == 2 and "--factscore-db: not used by --task qa" in other.stderr
    missing = write_jsonl(tmp_path / "bad.jsonl", [{"input": "Tell me a bio of X."}])
    bad = run_cli("eval", "--task", "factscore", "--data", missing, "--predictions", preds, "-o", tmp_path / "b.json")
    assert bad.exit_code == 3 and "bad.jsonl:1: field 'topic'" in bad.stderr
