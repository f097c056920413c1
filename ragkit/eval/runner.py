"""Scoring: predictions against a task's examples, and retrieval runs against BEIR qrels."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ragkit.errors import InputError, Location, ResourceError
from ragkit.eval.report import aggregate
from ragkit.eval.retrieval_metrics import mrr_at_k, ndcg_at_k, recall_at_k
from ragkit.eval.tasks import Example, Task
from ragkit.io.jsonl import display_name, read_jsonl
from ragkit.io.qrels import read_qrels

PREDICTION_FIELDS = ("output", "prediction", "pred", "answer")


def read_predictions(path: str | Path) -> dict[str, tuple[int, dict[str, Any]]]:
    """id -> (line, row) from `ragkit generate` output (or any JSONL with id and output)."""
    name = display_name(path)
    out: dict[str, tuple[int, dict[str, Any]]] = {}
    for lineno, obj in read_jsonl(path):
        if "id" not in obj:
            raise InputError(Location(name, lineno, "id"), "field 'id' is missing")
        key = next((k for k in PREDICTION_FIELDS if k in obj), None)
        if key is None:
            raise InputError(Location(name, lineno, "output"), "field 'output' is missing")
        if not isinstance(obj[key], str):
            raise InputError(Location(name, lineno, key), f"field '{key}' must be a string")
        pid = str(obj["id"])
        if pid in out:
            raise InputError(Location(name, lineno, "id"), f"duplicate prediction id '{pid}' (first on line {out[pid][0]})")
        out[pid] = (lineno, {**obj, "output": obj[key]})
    if not out:
        raise InputError(Location(name), "empty input: no predictions")
    return out


def match_predictions(examples: list[Example], predictions: dict[str, tuple[int, dict[str, Any]]], source: str,
                      data_name: str) -> list[tuple[Example, dict[str, Any]]]:
    by_id = {e.id: e for e in examples}
    for pid, (lineno, _) in predictions.items():
        if pid not in by_id:
            raise InputError(Location(source, lineno, "id"), f"id '{pid}' is not in the data {data_name}",
                             hint="Generate from the same --data file (ids are the data's `id`, or its line number).")
    return [(e, predictions[e.id][1]) for e in examples if e.id in predictions]


def score(task: Task, pairs: Iterable[tuple[Example, dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for example, prediction in pairs:
        metrics = task.score(example, prediction["output"])
        if isinstance(prediction.get("retrieved"), bool):  # Self-RAG: how often it chose to retrieve
            metrics["retrieved"] = float(prediction["retrieved"])
        row = {"id": example.id, "question": example.question, "golds": example.golds,
               "prediction": prediction["output"], "metrics": metrics}
        if prediction.get("passages"):
            row["passage_ids"] = [p.get("id") for p in prediction["passages"]]
        rows.append(row)
    return rows


# -- BEIR ---------------------------------------------------------------------------------------------
def load_beir(folder: str | Path, split: str = "test") -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    root = Path(folder)
    queries_path, qrels_path = root / "queries.jsonl", root / "qrels" / f"{split}.tsv"
    for p in (queries_path, qrels_path):
        if not p.exists():
            raise ResourceError(f"{p}: missing (a BEIR folder has queries.jsonl and qrels/{split}.tsv)")
    qrels = read_qrels(qrels_path)
    queries = {}
    for lineno, obj in read_jsonl(queries_path):
        qid = str(obj.get("_id", obj.get("id")))
        if qid in qrels:
            if not isinstance(obj.get("text"), str):
                raise InputError(Location(str(queries_path), lineno, "text"), "field 'text' is missing")
            queries[qid] = obj["text"]
    missing = sorted(set(qrels) - set(queries))
    if missing:
        raise InputError(Location(str(queries_path)), f"{len(missing)} qrels queries have no text (first: {missing[0]})")
    return queries, qrels


def read_search_run(path: str | Path, qrels: dict[str, dict[str, int]]) -> dict[str, list[str]]:
    """query id -> ranked doc ids, from `ragkit index search` output."""
    name = display_name(path)
    run: dict[str, list[str]] = {}
    for lineno, obj in read_jsonl(path):
        if "id" not in obj:
            raise InputError(Location(name, lineno, "id"), "field 'id' is missing")
        hits = obj.get("hits")
        if not isinstance(hits, list):
            raise InputError(Location(name, lineno, "hits"), "field 'hits' is missing")
        qid = str(obj["id"])
        if qid not in qrels:
            raise InputError(Location(name, lineno, "id"), f"query id '{qid}' is not in the qrels")
        run[qid] = [str(h["id"]) for h in hits]
    if not run:
        raise InputError(Location(name), "empty input: no search results")
    return run


def score_retrieval(run: dict[str, list[str]], qrels: dict[str, dict[str, int]], k: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows = []
    for qid, relevant in qrels.items():
        if not any(r > 0 for r in relevant.values()):
            continue
        ranked = run.get(qid, [])
        rows.append({"id": qid, "retrieved": ranked[:10], "relevant": sorted(relevant),
                     "metrics": {"ndcg@10": ndcg_at_k(ranked, relevant, 10), f"recall@{k}": recall_at_k(ranked, relevant, k),
                                 "recall@10": recall_at_k(ranked, relevant, 10), "mrr@10": mrr_at_k(ranked, relevant, 10)}})
    names = ("ndcg@10", "recall@10", f"recall@{k}", "mrr@10")
    return rows, aggregate(rows, names, binary=())
