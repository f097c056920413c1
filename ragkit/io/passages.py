"""The one JSON shape of a passage in output rows: {id, title, text, score}."""

from __future__ import annotations

import math
from typing import Any


def passage_json(p: dict[str, Any]) -> dict[str, Any]:
    """A score that is not a finite number (a row's own "nan" or "1e999", which float() takes) is dropped like
    an unparsable one: output rows never carry NaN or Infinity, which no JSON reader but Python's accepts."""
    score = p.get("score")
    try:
        score = float(score) if score is not None else None
    except (TypeError, ValueError):
        score = None
    if score is not None and not math.isfinite(score):
        score = None
    return {"id": p.get("id"), "title": p.get("title", ""), "text": p.get("text", ""), "score": score}
