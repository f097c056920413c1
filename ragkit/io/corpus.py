"""Passage corpora: ragkit JSONL, BEIR `corpus.jsonl` (or its folder), DPR-style TSV.

Every reader yields `Passage` objects and checks ids as it goes, so a bad line is reported with its
file and line number before anything is embedded or stored.
"""

from __future__ import annotations

import csv
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragkit.errors import InputError, Location, ResourceError
from ragkit.io.jsonl import display_name, open_text, read_jsonl

ID_FIELDS = ("id", "_id")  # ragkit/DPR use `id`, BEIR uses `_id`


@dataclass
class Passage:
    id: str
    text: str
    title: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def embedding_text(self) -> str:
        """What the encoder sees: `title text`, the BEIR/MTEB convention behind published scores."""
        return f"{self.title} {self.text}" if self.title else self.text

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "text": self.text, **self.metadata}


def resolve_corpus_path(path: str | Path) -> str | Path:
    """A BEIR folder stands for its corpus.jsonl."""
    if str(path) == "-":
        return path
    p = Path(path)
    if p.is_dir():
        if (p / "corpus.jsonl").exists():
            return p / "corpus.jsonl"
        raise ResourceError(f"{p}: a folder without corpus.jsonl", hint="Pass a .jsonl/.tsv file or a BEIR folder.")
    return p


def _passage_from_json(obj: dict[str, Any], where: Location) -> Passage:
    raw_id = next((obj[k] for k in ID_FIELDS if k in obj), None)
    if raw_id is None:
        raise InputError(Location(where.path, where.line, "id"), "field 'id' is missing")
    if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool) or str(raw_id) == "":
        raise InputError(Location(where.path, where.line, "id"), "field 'id' must be a non-empty string or integer")
    text = obj.get("text")
    if text is None:
        raise InputError(Location(where.path, where.line, "text"), "field 'text' is missing")
    if not isinstance(text, str):
        raise InputError(Location(where.path, where.line, "text"), "field 'text' must be a string")
    title = obj.get("title") or ""
    if not isinstance(title, str):
        raise InputError(Location(where.path, where.line, "title"), "field 'title' must be a string")
    metadata = {k: v for k, v in obj.items() if k not in (*ID_FIELDS, "text", "title")}
    return Passage(id=str(raw_id), text=text, title=title, metadata=metadata)


def _read_jsonl_passages(path: str | Path) -> Iterator[tuple[int, Passage]]:
    name = display_name(path)
    for lineno, obj in read_jsonl(path):
        yield lineno, _passage_from_json(obj, Location(name, lineno))


# Header names of the TSV corpora in use (DPR's psgs_w100: id/text/title; Pyserini/MS MARCO: docid/contents,
# pid/passage), mapped to ragkit's fields.
TSV_COLUMNS = {"id": "id", "_id": "id", "docid": "id", "doc_id": "id", "pid": "id",
               "text": "text", "contents": "text", "passage": "text", "body": "text", "title": "title"}


def _tsv_header(row: list[str], where: Location) -> list[str] | None:
    """Column names when `row` is a header, else None (a data row: DPR files come with or without one).

    A first row whose first cell is an id column name is a header; it must name a text column too, and a
    column that is neither is kept under its own name (metadata), never mapped by position."""
    names = [cell.strip().lower() for cell in row]
    if not names or TSV_COLUMNS.get(names[0]) != "id":
        if len(names) >= 2 and all(name in TSV_COLUMNS for name in names[1:]):  # "key\ttext\ttitle"
            raise InputError(where, f"the header's first column '{row[0]}' is not an id column "
                                    f"({', '.join(k for k, v in TSV_COLUMNS.items() if v == 'id')})")
        if _looks_like_header(row):  # "identifier\tbody\theading" was stored as a passage
            raise InputError(where, f"the first row looks like a header of column names ragkit does not know "
                                    f"({', '.join(repr(c) for c in row)}), not a passage",
                             hint="name the columns id, text, title (DPR's psgs_w100 layout), or remove the row")
        return None
    mapped = [TSV_COLUMNS.get(name, cell.strip()) for name, cell in zip(names, row)]
    if "text" not in mapped:
        raise InputError(where, f"the header names no text column (one of {', '.join(k for k, v in TSV_COLUMNS.items() if v == 'text')})",
                         hint="name the columns id, text, title (DPR's psgs_w100 layout)")
    if len(set(mapped)) != len(mapped):
        raise InputError(where, f"the header maps two columns to one field: {row}")
    return mapped


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,39}")


def _looks_like_header(row: list[str]) -> bool:
    """At least two cells, every one a bare name (one word, no spaces), the first without a digit: a header,
    whatever names it uses; a passage row has an id (ids carry digits) and a text of several words."""
    cells = [cell.strip() for cell in row]
    return (len(cells) >= 2 and all(_NAME.fullmatch(cell) for cell in cells)
            and not any(ch.isdigit() for ch in cells[0]))


def _read_tsv_passages(path: Path) -> Iterator[tuple[int, Passage]]:
    """DPR `psgs_w100.tsv`: columns id, text, title, with or without that header row (or a header of
    known names in any order: docid/contents, pid/passage, ...)."""
    name = str(path)
    csv.field_size_limit(sys.maxsize)
    with open_text(path) as handle:
        reader = csv.reader(handle, delimiter="\t", strict=True)
        columns = ["id", "text", "title"]
        while True:
            lineno = reader.line_num + 1  # the physical line this record starts on
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:  # a quote still open at the end of the file
                raise InputError(Location(name, lineno), f"unreadable TSV row ({exc})",
                                 hint="a field that starts with a double quote must end with one on the same line") from None
            if reader.line_num > lineno:  # a quoted field ran on over the next lines, swallowing their rows
                raise InputError(Location(name, lineno), f"a double quote opened on this line is closed only on line "
                                 f"{reader.line_num}: rows would merge",
                                 hint="a field that starts with a double quote must end with one on the same line "
                                      "(write a quote inside it as two)")
            if not row or all(not cell.strip() for cell in row):
                continue
            if lineno == 1 and (header := _tsv_header(row, Location(name, 1))) is not None:
                columns = header
                continue
            if len(row) < 2:
                raise InputError(Location(name, lineno), f"expected at least 2 tab-separated columns (id, text), got {len(row)}")
            obj: dict[str, Any] = dict(zip(columns, row))
            yield lineno, _passage_from_json(obj, Location(name, lineno))


def iter_passages(path: str | Path, *, check_duplicates: bool = True) -> Iterator[Passage]:
    """Yield passages from any supported corpus file; duplicate ids and empty corpora are errors."""
    path = resolve_corpus_path(path)
    name = display_name(path)
    rows = _read_tsv_passages(Path(path)) if str(path).endswith(".tsv") else _read_jsonl_passages(path)
    first_line: dict[str, int] = {}
    count = 0
    for lineno, passage in rows:
        if check_duplicates:
            if passage.id in first_line:
                raise InputError(
                    Location(name, lineno, "id"),
                    f"duplicate id '{passage.id}' (first on line {first_line[passage.id]})",
                )
            first_line[passage.id] = lineno
        count += 1
        yield passage
    if count == 0:
        raise InputError(Location(name), "empty corpus: no passages found")


def iter_passages_with_lines(path: str | Path, *, allow_empty: bool = False) -> Iterator[tuple[int, Passage]]:
    """(line number, passage) from any supported corpus file, without remembering ids (the index's
    passage store refuses a duplicate, naming its line): memory stays flat on any corpus size.
    allow_empty: a file with no passages is fine (an embedding shard past the corpus's end)."""
    path = resolve_corpus_path(path)
    rows = _read_tsv_passages(Path(path)) if str(path).endswith(".tsv") else _read_jsonl_passages(path)
    count = 0
    for lineno, passage in rows:
        count += 1
        yield lineno, passage
    if count == 0 and not allow_empty:
        raise InputError(Location(display_name(path)), "empty corpus: no passages found")


def read_passages(path: str | Path) -> list[Passage]:
    return list(iter_passages(path))
