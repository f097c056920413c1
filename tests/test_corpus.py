"""Corpus readers: formats, metadata, and errors that name file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragkit.errors import ExitCode, InputError, ResourceError
from ragkit.io.corpus import read_passages
from ragkit.io.queries import iter_queries

from conftest import write_jsonl


def test_jsonl_keeps_title_and_metadata(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": 7, "title": "T", "text": "body", "url": "u", "year": 1999}])
    [p] = read_passages(path)
    assert (p.id, p.title, p.text, p.metadata) == ("7", "T", "body", {"url": "u", "year": 1999})
    assert p.embedding_text() == "T body"


def test_beir_folder_and_underscore_id(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "d1", "title": "", "text": "x"}, {"_id": "d2", "text": "y"}])
    passages = read_passages(tmp_path)
    assert [p.id for p in passages] == ["d1", "d2"]
    assert passages[0].embedding_text() == "x"


@pytest.mark.parametrize("header", [True, False])
def test_dpr_tsv(tmp_path: Path, header: bool) -> None:
    lines = (["id\ttext\ttitle"] if header else []) + ["1\tAaron is a prophet.\tAaron", "2\tSecond text\tB"]
    path = tmp_path / "psgs.tsv"
    path.write_text("\n".join(lines) + "\n")
    passages = read_passages(path)
    assert [(p.id, p.title, p.text) for p in passages] == [("1", "Aaron", "Aaron is a prophet."), ("2", "B", "Second text")]


@pytest.mark.parametrize(
    "lines, expected",
    [
        (['{"id": "a", "text": "x"}', '{"id": "b", "text": }'], "c.jsonl:2: malformed JSON"),
        (['{"id": "a", "text": "x"}', '{"id": "b"}'], "c.jsonl:2: field 'text' is missing"),
        (['{"text": "x"}'], "c.jsonl:1: field 'id' is missing"),
        (['{"id": "a", "text": 3}'], "c.jsonl:1: field 'text' must be a string"),
        (['{"id": "a", "text": "x"}', "", '{"id": "a", "text": "y"}'], "c.jsonl:3: field 'id': duplicate id 'a' (first on line 1)"),
        (["[1, 2]"], "c.jsonl:1: expected a JSON object"),
        (["", "  "], "c.jsonl: empty corpus"),
    ],
)
def test_bad_corpus_lines(tmp_path: Path, lines: list[str], expected: str) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as err:
        read_passages(path)
    assert expected in err.value.message
    assert err.value.message.startswith(str(path))
    assert err.value.exit_code == ExitCode.INVALID_INPUT


def test_missing_file_is_a_resource_error(tmp_path: Path) -> None:
    with pytest.raises(ResourceError, match="no such file"):
        read_passages(tmp_path / "nope.jsonl")


def test_queries_plain_and_jsonl_pass_through_fields(tmp_path: Path) -> None:
    path = tmp_path / "q.txt"
    path.write_text('who wrote hamlet\n{"id": 5, "question": "capital of france", "answers": ["Paris"]}\n')
    first, second = list(iter_queries(path))
    assert (first.id, first.text, first.extra) == (None, "who wrote hamlet", {})
    assert (second.id, second.text) == ("5", "capital of france")
    assert second.extra == {"question": "capital of france", "answers": ["Paris"]}


def test_query_without_text_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": 1, "q": "x"}\n')
    with pytest.raises(InputError, match=r"q.jsonl:1: field 'query' is missing"):
        list(iter_queries(path))
