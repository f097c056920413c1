"""Commands compose through real shell pipes (issue 14.5): search output is generate input is eval input."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import make_passages, write_jsonl

# real PopQA rows carried with the tests (tests/data/README.md), so that a clone without ../shared tests them
POPQA = Path(__file__).resolve().parent / "data" / "popqa_longtail_w_gs.first16.jsonl"


def test_search_then_generate_with_its_hits_then_eval_through_a_shell_pipe(tmp_path: Path, tiny_encoder_path: Path,
                                                                          tiny_lm_path: Path) -> None:
    ragkit = f"{shlex.quote(sys.executable)} -m ragkit.cli"
    corpus = write_jsonl(tmp_path / "c.jsonl", make_passages(20))
    questions = [{k: row[k] for k in ("id", "question", "answers")}
                 for row in map(json.loads, POPQA.read_text().splitlines()[:4])]
    data = write_jsonl(tmp_path / "q.jsonl", questions)
    build = subprocess.run(f"{ragkit} index build {corpus} -o {tmp_path / 'idx'} -m {tiny_encoder_path} --device cpu",
                           shell=True, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    pipe = (f"set -o pipefail; {ragkit} index search {tmp_path / 'idx'} -q {data} --k 2 --device cpu"
            f" | tee {tmp_path / 'hits.jsonl'}"
            f" | {ragkit} generate --arch rag --passages hits --k 2 --model {tiny_lm_path} --max-new-tokens 3 --device cpu"
            f" | tee {tmp_path / 'answers.jsonl'}"
            f" | {ragkit} eval --task popqa --data {data} --json")
    done = subprocess.run(["bash", "-c", pipe], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    hits = [json.loads(line) for line in (tmp_path / "hits.jsonl").read_text().splitlines()]
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [h["id"] for h in hits] == [str(q["id"]) for q in questions] == [a["id"] for a in answers]
    for row, answer in zip(hits, answers):  # the reader read the passages search found
        assert [p["id"] for p in answer["passages"]] == [h["id"] for h in row["hits"]]
    report = json.loads(done.stdout)
    assert report["task"] == "popqa" and report["metrics"]["match"]["n"] == 4
