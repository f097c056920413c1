"""Real text for the RETRO benchmarks, as one file per document: the WikiText-2 validation articles
(../shared/data/lm_text/wikitext-2.valid.txt; a line ' = Title = ' starts an article) and Tiny Shakespeare
cut into blocks of lines. Written under benchmarks/.work, never into the repository."""

from __future__ import annotations

import re
from pathlib import Path

from _common import SHARED_DATA

HEADING = re.compile(r"^ = [^=].* = $")


def wikitext_articles() -> list[str]:
    articles: list[list[str]] = []
    for line in (SHARED_DATA / "lm_text" / "wikitext-2.valid.txt").read_text(encoding="utf-8").splitlines(keepends=True):
        if HEADING.match(line.rstrip("\n")):
            articles.append([])
        if articles:
            articles[-1].append(line)
    return ["".join(a).strip("\n") + "\n" for a in articles]


def shakespeare_blocks(lines_per_block: int = 200) -> list[str]:
    lines = (SHARED_DATA / "lm_text" / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    return ["".join(lines[i:i + lines_per_block]) for i in range(0, len(lines), lines_per_block)]


def write_split(documents: list[str], folder: Path, *, validation_every: int = 10) -> tuple[Path, Path]:
    """Every `validation_every`-th document to valid/, the rest to train/: a split by document."""
    train, valid = folder / "train", folder / "valid"
    for target in (train, valid):
        target.mkdir(parents=True, exist_ok=True)
        for old in target.glob("*.txt"):
            old.unlink()
    for i, text in enumerate(documents):
        target = valid if i % validation_every == validation_every - 1 else train
        (target / f"{i:05d}.txt").write_text(text, encoding="utf-8")
    return train, valid
