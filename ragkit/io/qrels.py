"""BEIR / TREC relevance judgements (`qrels/test.tsv`: query-id, corpus-id, score), read once for eval and training."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ragkit.errors import InputError, Location
from ragkit.io.jsonl import open_text


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """query id -> {passage id: graded relevance}, in file order. A score written as a float with no
    fraction (`1.0`, as some exporters do) is that integer; anything else names its file and line."""
    qrels: dict[str, dict[str, int]] = {}
    with open_text(path) as handle:
        for lineno, row in enumerate(csv.reader(handle, delimiter="\t"), start=1):
            if not row or (lineno == 1 and row[0] == "query-id"):
                continue
            if len(row) < 3:
                raise InputError(Location(str(path), lineno), "expected query-id, corpus-id, score")
            try:
                score = float(row[2])
            except ValueError:
                score = math.nan
            if not math.isfinite(score) or not score.is_integer():
                raise InputError(Location(str(path), lineno, "score"), f"score must be an integer, got {row[2]!r}")
            qrels.setdefault(row[0], {})[row[1]] = int(score)
    return qrels
