"""Embedding shards that are damaged or foreign are refused with exit 3 naming the shard (and the row where it
matters), and nothing is published (issue 27.10: NaN rows were accepted and their passages never came back,
1e30-scaled or int8 shards built and then broke every search, a truncated or pickled .npy was exit 1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_passages, run_cli, write_jsonl


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, tiny_encoder_path: Path) -> Path:
    root = tmp_path_factory.mktemp("shards")
    corpus = write_jsonl(root / "c.jsonl", make_passages(30))
    for shard in (0, 1):
        done = run_cli("embed", corpus, "-o", root / "emb", "-m", tiny_encoder_path, "--device", "cpu",
                       "--num-shards", 2, "--shard-id", shard, "--dtype", "float32")
        assert done.exit_code == 0, done.stderr
    return root / "emb"


def tampered(shards: Path, tmp_path: Path, change) -> Path:  # noqa: ANN001
    copy = tmp_path / "emb"
    copy.mkdir()
    for path in shards.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    change(copy)
    return copy


VECTORS, META = "embeddings-00000-of-00002.npy", "shard-00000-of-00002.json"


def edit_vectors(edit):  # noqa: ANN001
    def change(root: Path) -> None:
        vectors = np.load(root / VECTORS)
        np.save(root / VECTORS, edit(vectors))
    return change


def set_row(value: float):  # noqa: ANN201
    def edit(v: np.ndarray) -> np.ndarray:
        v[4, 1] = value
        return v
    return edit


def edit_meta(**fields):  # noqa: ANN001, ANN201
    def change(root: Path) -> None:
        meta = json.loads((root / META).read_text())
        (root / META).write_text(json.dumps({**meta, **fields}))
    return change


CASES = {
    "nan": (edit_vectors(set_row(np.nan)), rf"{VECTORS}:5: row 5: the vector is not finite"),
    "inf": (edit_vectors(set_row(np.inf)), rf"{VECTORS}:5: row 5: the vector is not finite"),
    "scaled-1e30": (edit_vectors(lambda v: v * np.float32(1e30)), rf"{VECTORS}:1: row 1: the vector has norm 1e\+30"),
    "int8": (edit_vectors(lambda v: (v * 100).astype(np.int8)), "stored as int8"),
    "rows-disagree": (edit_meta(rows=14), "field 'rows': 15 vectors, its shard description says 14"),
    "other-num-shards": (edit_meta(num_shards=3), "field 'num_shards': describes shard 0 of 3"),
    "truncated": (lambda r: (r / VECTORS).write_bytes((r / VECTORS).read_bytes()[:200]), "not a readable .npy"),
    "pickled": (lambda r: np.save(r / VECTORS, np.array([{"a": 1}] * 15, dtype=object), allow_pickle=True),
                "not a readable .npy"),
    "not-npy": (lambda r: (r / VECTORS).write_text("hello"), "not a readable .npy"),
    "missing": (lambda r: (r / VECTORS).unlink(), "the shard's vectors file is missing"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_shard_is_exit_3_naming_it_and_nothing_is_published(case: str, shards: Path, tmp_path: Path) -> None:
    import re

    change, message = CASES[case]
    emb = tampered(shards, tmp_path, change)
    index = tmp_path / "idx"
    result = run_cli("index", "build", "--embeddings", emb, "-o", index)
    assert result.exit_code == 3, (result.exit_code, result.stderr[-1500:])
    assert re.search(message, result.stderr), result.stderr
    assert not (index / "CURRENT").exists()


def test_the_untouched_shards_build(shards: Path, tmp_path: Path) -> None:
    assert run_cli("index", "build", "--embeddings", shards, "-o", tmp_path / "idx").exit_code == 0
