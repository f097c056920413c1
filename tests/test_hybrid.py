"""The BM25 side of an index and hybrid retrieval: kept in step with add/remove, fused rankings by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_passages, write_jsonl
from ragkit.cli import app
from ragkit.index import Hit
from ragkit.retrieval.fusion import fuse


def run(*args: object, input: str | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def hits(ids: list[str], scores: list[float]) -> list[Hit]:
    return [Hit(i, s, r, "", "") for r, (i, s) in enumerate(zip(ids, scores), start=1)]


def test_rrf_by_hand() -> None:
    dense, sparse = hits(["a", "b", "c"], [0.9, 0.8, 0.1]), hits(["c", "a"], [12.0, 3.0])
    fused = fuse(dense, sparse, 3, method="rrf", weight=0.5, rrf_k=60)
    expected = {"a": 0.5 / 61 + 0.5 / 62, "b": 0.5 / 62, "c": 0.5 / 63 + 0.5 / 61}
    assert [h.id for h in fused] == ["a", "c", "b"]
    assert [h.score for h in fused] == pytest.approx([expected["a"], expected["c"], expected["b"]])
    assert [h.rank for h in fused] == [1, 2, 3]
    assert [h.id for h in fuse(dense, sparse, 3, weight=0.0)] == ["c", "a", "b"]  # sparse only: b never seen


def test_score_fusion_min_max_by_hand() -> None:
    dense, sparse = hits(["a", "b", "c"], [0.9, 0.7, 0.5]), hits(["c", "a"], [10.0, 4.0])
    fused = {h.id: h.score for h in fuse(dense, sparse, 3, method="score", weight=0.7)}
    assert fused == pytest.approx({"a": 0.7 * 1.0 + 0.3 * 0.0, "b": 0.7 * 0.5, "c": 0.7 * 0.0 + 0.3 * 1.0})


@pytest.fixture
def hybrid_index(tmp_path: Path, tiny_encoder_path: Path) -> Path:
    passages = make_passages(30)
    passages[7]["text"] = "zebra quagga okapi " + passages[7]["text"]
    corpus = write_jsonl(tmp_path / "c.jsonl", passages)
    out = tmp_path / "idx"
    result = run("index", "build", corpus, "-o", out, "--model", tiny_encoder_path, "--device", "cpu", "--sparse")
    assert result.exit_code == 0, result.stderr
    return out


def search(index: Path, query: str, *extra: object) -> list[str]:
    result = run("index", "search", index, "--k", 5, "--device", "cpu", *extra, input=query + "\n")
    assert result.exit_code == 0, result.stderr
    return [h["id"] for h in json.loads(result.stdout)["hits"]]


def test_sparse_side_follows_add_and_remove(hybrid_index: Path, tmp_path: Path) -> None:
    assert search(hybrid_index, "okapi", "--mode", "sparse") == ["doc-7"]  # only one passage has the term
    new = write_jsonl(tmp_path / "new.jsonl", [{"id": "new-1", "text": "an okapi and a zebra in the city"}])
    assert run("index", "add", hybrid_index, new, "--device", "cpu").exit_code == 0
    assert set(search(hybrid_index, "okapi zebra", "--mode", "sparse")) == {"doc-7", "new-1"}
    assert run("index", "remove", hybrid_index, "--ids", "doc-7").exit_code == 0
    assert search(hybrid_index, "okapi", "--mode", "sparse") == ["new-1"]
    info = json.loads(run("index", "info", hybrid_index, "--json").stdout)
    assert info["sparse"]["library"] == "bm25s"
    manifest = json.loads((hybrid_index / "current" / "manifest.json").read_text())
    assert any(name.endswith(".bm25.npz") for name in manifest["files"])  # checksummed like the vectors


def test_hybrid_contains_both_sides(hybrid_index: Path) -> None:
    dense = search(hybrid_index, "okapi city river")
    hybrid = search(hybrid_index, "okapi city river", "--mode", "hybrid")
    assert "doc-7" in hybrid and hybrid[0] in {dense[0], "doc-7"}
    only_dense = search(hybrid_index, "okapi city river", "--mode", "hybrid", "--dense-weight", "1.0")
    assert only_dense == dense


def test_sparse_mode_without_a_sparse_side_then_added(tmp_path: Path, tiny_encoder_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", make_passages(10))
    out = tmp_path / "idx"
    assert run("index", "build", corpus, "-o", out, "--model", tiny_encoder_path, "--device", "cpu").exit_code == 0
    result = run("index", "search", out, "--mode", "sparse", input="city\n")
    assert result.exit_code == 4 and "no sparse (BM25) side" in result.stderr
    added = run("index", "sparse", out, "--json")
    assert added.exit_code == 0, added.stderr
    assert json.loads(added.stdout)["version"] == 2
    assert run("index", "search", out, "--mode", "sparse", input="city\n").exit_code == 0
    bad = run("index", "search", out, "--mode", "fuzzy", input="city\n")
    assert bad.exit_code == 2 and "--mode fuzzy" in bad.stderr


def test_int8_encoder_backend_keeps_the_fingerprint_and_close_vectors(tiny_encoder_path: Path) -> None:
    import numpy as np

    from ragkit.models.encoder import Encoder

    texts = [" ".join(p["text"].split()[:8]) for p in make_passages(12)]
    plain = Encoder(str(tiny_encoder_path), device="cpu")
    fast = Encoder(str(tiny_encoder_path), device="cpu", backend="int8")
    assert fast.info.fingerprint == plain.info.fingerprint  # an index built either way accepts both
    a, b = plain.encode(texts), fast.encode(texts)
    cosine = (a * b).sum(axis=1)
    assert cosine.min() > 0.95 and not np.allclose(a, b)  # approximate, not identical
    assert plain.encode(texts).tolist() == a.tolist()  # the cached float model was not quantised in place
