"""Bad bytes to every reading command (issue 17.5): exit 3, and the message names the file and the line.

Each command gets the same three broken files: Latin-1 on line 2, UTF-16 (with its byte-order mark),
and binary (NUL bytes); through stdin where the command reads it. A UTF-8 byte-order mark is accepted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_passages, write_jsonl
from ragkit.cli import app

runner = CliRunner()


def run(*args: object, input: bytes | str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


GOOD_LINE = '{"id": "p1", "text": "river king city", "question": "river king?", "answers": ["city"], "output": "city"}\n'
BAD = {
    "latin1": (GOOD_LINE.encode() + '{"id": "p2", "text": "café", "question": "café?", "answers": ["x"]}\n'.encode("latin-1"), 2),
    "utf16": (GOOD_LINE.encode("utf-16"), 1),
    "binary": (b"\x00\x01\x02\x7fELF\x00\x00" * 8 + b"\n", 1),
}


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory, tiny_encoder_path: Path) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    corpus = write_jsonl(root / "c.jsonl", make_passages(20))
    assert run("index", "build", corpus, "-o", root / "idx", "-m", tiny_encoder_path, "--device", "cpu").exit_code == 0
    return root / "idx"


def commands(index: Path, encoder: Path, lm: Path, bad: Path, out: Path) -> dict[str, list[object]]:
    return {
        "index build": ["index", "build", bad, "-o", out / "new", "-m", encoder, "--device", "cpu"],
        "index add": ["index", "add", index, bad, "--device", "cpu"],
        "index search -q": ["index", "search", index, "-q", bad, "--device", "cpu"],
        "index remove --ids-file": ["index", "remove", index, "--ids-file", bad],
        "embed": ["embed", bad, "-o", out / "emb", "-m", encoder, "--device", "cpu"],
        "eval --data": ["eval", "--task", "qa", "--data", bad],
        "generate": ["generate", bad, "--model", lm, "--max-new-tokens", 2, "--device", "cpu"],
        "train --data": ["train", "--arch", "rag", "--data", bad, "--index", index, "--generator", lm, "-o",
                         out / "run", "--max-steps", 1, "--device", "cpu"],
    }


COMMANDS = ["index build", "index add", "index search -q", "index remove --ids-file", "embed", "eval --data",
            "generate", "train --data"]


@pytest.mark.parametrize("kind", sorted(BAD))
@pytest.mark.parametrize("command", COMMANDS)
def test_bad_bytes_are_exit_3_naming_file_and_line(command: str, kind: str, index: Path, tiny_encoder_path: Path,
                                                   tiny_lm_path: Path, tmp_path: Path) -> None:
    data, line = BAD[kind]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(data)
    before = sorted(p.name for p in index.iterdir())
    args = commands(index, tiny_encoder_path, tiny_lm_path, bad, tmp_path)[command]
    result = run(*args, input="" if command == "eval --data" else None)
    assert result.exit_code == 3, (result.exit_code, result.output[-1500:])
    assert f"{bad}:{line}:" in result.stderr, result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.output
    assert sorted(p.name for p in index.iterdir()) == before  # nothing published, nothing half-written
    new = tmp_path / "new"
    assert not new.exists() or sorted(p.name for p in new.iterdir()) == [".lock"]  # no index, no leftovers


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_bytes_on_stdin_are_exit_3_naming_the_line(kind: str, index: Path) -> None:
    data, line = BAD[kind]
    result = run("index", "search", index, "-q", "-", "--device", "cpu", input=data)
    assert result.exit_code == 3, result.output[-1500:]
    assert f"<stdin>:{line}:" in result.stderr


def test_a_utf8_byte_order_mark_is_accepted(index: Path, tiny_encoder_path: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "bom.jsonl"
    corpus.write_bytes(b"\xef\xbb\xbf" + GOOD_LINE.encode())
    assert run("index", "build", corpus, "-o", tmp_path / "idx", "-m", tiny_encoder_path, "--device", "cpu").exit_code == 0
    result = run("index", "search", tmp_path / "idx", "-q", corpus, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[0])["hits"][0]["id"] == "p1"


@pytest.mark.parametrize(("header", "expected"), [
    ("docid\tcontents\ttitle", {"id": "7", "text": "hello world", "title": "T"}),
    ("pid\tpassage\ttitle", {"id": "7", "text": "hello world", "title": "T"}),
])
def test_tsv_headers_of_known_names_are_mapped_by_name(header: str, expected: dict, tmp_path: Path) -> None:
    from ragkit.io.corpus import read_passages

    path = tmp_path / "c.tsv"
    path.write_text(f"{header}\n7\thello world\tT\n")
    [passage] = read_passages(path)
    assert {"id": passage.id, "text": passage.text, "title": passage.title} == expected


@pytest.mark.parametrize("header", ["docid\tfoo", "key\ttext\ttitle"])
def test_tsv_headers_that_do_not_name_id_and_text_are_refused(header: str, tmp_path: Path) -> None:
    from ragkit.errors import InputError
    from ragkit.io.corpus import read_passages

    path = tmp_path / "c.tsv"
    path.write_text(f"{header}\n7\thello\tT\n")
    with pytest.raises(InputError, match=r"c\.tsv:1: the header"):
        read_passages(path)
