"""The one JSON shape of a passage in output rows: {id, title, text, score}."""

from __future__ import annotations

from typing import Any


def passage_json(p: dict[str, Any]) -> dict[str, Any]:
    score = p.get("score")
    try:
        score = float(score) if score is not None else None
    except (TypeError, ValueError):
        score = None
    return {"id": p.get("id"), "title": p.get("title", ""), "text": p.get("text", ""), "score": score}
