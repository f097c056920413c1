"""FActScore (Min et al., 2023) for `eval --task factscore`: the generations written in the file FActScore
reads ({topic, output} per line, with Self-RAG's input and cat kept), and FActScore's own scorer run on it
when the `factscore` package and its knowledge source are there. Without them the report says why there is
no score; ragkit never computes a stand-in."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from ragkit.io.atomic import atomic_open


def write_factscore_file(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON line per generation: FActScore's {topic, output}, plus input and cat as Self-RAG writes."""
    with atomic_open(path) as handle:
        for row in rows:
            handle.write(json.dumps({"topic": row["topic"], "output": row["output"], "input": row.get("input"),
                                     "cat": row.get("cat")}, ensure_ascii=False) + "\n")


def score(rows: list[dict[str, Any]], *, knowledge_source: str | None, model_name: str = "retrieval+ChatGPT",
          cache_dir: str | None = None) -> dict[str, Any]:
    """FActScore's score of the generations, or {"scored": False, "reason": ...} when it cannot run here."""
    reason = unavailable(knowledge_source, model_name)
    if reason is not None:
        return {"scored": False, "reason": reason}
    from factscore.factscorer import FactScorer  # type: ignore[import-not-found]

    assert knowledge_source is not None
    scorer = FactScorer(model_name=model_name, data_dir=str(Path(knowledge_source).parent),
                        cache_dir=cache_dir or str(Path(knowledge_source).parent / "factscore-cache"),
                        openai_key=os.environ.get("OPENAI_API_KEY_FILE", "api.key"))
    scorer.register_knowledge_source("ragkit", db_path=knowledge_source)
    out = scorer.get_score([r["topic"] for r in rows], [r["output"] for r in rows], knowledge_source="ragkit")
    return {"scored": True, "factscore": float(out["score"]), "respond_ratio": float(out.get("respond_ratio", 1.0)),
            "facts_per_response": float(out.get("num_facts_per_response", 0.0)), "model": model_name}


def unavailable(knowledge_source: str | None, model_name: str) -> str | None:
    """Why FActScore cannot score here, or None when it can be run."""
    if importlib.util.find_spec("factscore") is None:
        return "the factscore package is not installed (pip install factscore==0.1.5, then its setup: README)"
    if not knowledge_source:
        return "no knowledge source: give --factscore-db PATH (FActScore's enwiki-20230401.db)"
    if not Path(knowledge_source).is_file():
        return f"--factscore-db {knowledge_source}: no such file"
    if "ChatGPT" in model_name and not (os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_API_KEY_FILE")):
        return f"{model_name} needs OpenAI access (OPENAI_API_KEY or OPENAI_API_KEY_FILE)"
    return None
