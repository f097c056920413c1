"""Bodies a JSON parser chokes on are 422 naming the field, like every other refusal (issue 27.9: deep
nesting, invalid UTF-8 and a 5,000-digit k were 400 {"detail": ...}, and "k": true was taken as k = 1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import make_passages, run_cli, write_jsonl

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from ragkit.serve.app import create_app  # noqa: E402
from ragkit.serve.config import ServeConfig  # noqa: E402


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory, tiny_encoder_path: Path) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    corpus = write_jsonl(root / "corpus.jsonl", make_passages(30))
    assert run_cli("index", "build", corpus, "-o", root / "idx", "--model", tiny_encoder_path,
                   "--device", "cpu").exit_code == 0
    return root / "idx"


JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("body, field", [
    (b'{"query": "a", "k": true}', "k"),
    (b'{"query": "a", "k": 2.0}', "k"),
    (b'{"query": "a", "k": "3"}', "k"),
    (b'{"query": "a", "k": ' + b"9" * 5000 + b"}", "k"),
    (b'{"query": "a", "dense_weight": true}', "dense_weight"),
    (b'{"query": "\xff\xfe"}', "body"),
    (b'{"query": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "body"),
    (b'{"query": ' + b"[" * 3000 + b"]" * 3000 + b"}", "body"),
])
def test_unparseable_or_mistyped_bodies_are_422_naming_the_field(index: Path, body: bytes, field: str) -> None:
    with TestClient(create_app(ServeConfig(index=[str(index)], device="cpu", max_body_bytes=1_000_000))) as client:
        response = client.post("/search", content=body, headers=JSON)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"] == field, response.text
        assert client.post("/search", json={"query": "alpha", "k": 2}).status_code == 200
