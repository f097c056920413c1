"""The Index: round trips, add/remove/upsert with stable ids, exactness, refusals and crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ragkit.errors import InputError, ResourceError, UsageError
from ragkit.index import Index
from ragkit.io.corpus import Passage
from ragkit.models.encoder import EncoderInfo

from conftest import unit_vectors

DIM = 16
ENC = EncoderInfo("test-encoder", DIM, True, 64, "f" * 32)


def passages(n: int, prefix: str = "p") -> list[Passage]:
    return [Passage(f"{prefix}{i}", f"text {i}", f"title {i}", {"n": i}) for i in range(n)]


def top_ids(index: Index, queries: np.ndarray, k: int = 1) -> list[list[str]]:
    return [[h.id for h in hits] for hits in index.search(queries, k)]


def test_flat_round_trip_is_exact(tmp_path: Path) -> None:
    x = unit_vectors(300, DIM)
    Index.build(tmp_path / "idx", passages(300), x, ENC)
    index = Index.open(tmp_path / "idx")
    q = unit_vectors(5, DIM, seed=9)
    hits = index.search(q, k=10)
    brute = q @ x.T
    for row, scores in zip(hits, brute):
        order = np.argsort(-scores)[:10]
        assert [h.id for h in row] == [f"p{i}" for i in order]
        np.testing.assert_allclose([h.score for h in row], scores[order], rtol=1e-5)
        assert [h.rank for h in row] == list(range(1, 11))
    first = hits[0][0]
    i = int(first.id[1:])
    assert (first.title, first.text, first.metadata) == (f"title {i}", f"text {i}", {"n": i})


def test_l2_metric_reports_negative_distances(tmp_path: Path) -> None:
    x = unit_vectors(50, DIM)
    index = Index.build(tmp_path / "idx", passages(50), x, ENC, metric="l2")
    [[hit]] = index.search(x[3:4] * 2, k=1)
    assert hit.id == "p3"
    assert hit.score == pytest.approx(-float(np.sum((x[3] * 2 - x[3]) ** 2)), rel=1e-5)


@pytest.mark.parametrize("spec", ["flat", "hnsw", "ivf-pq:nlist=8,m=4,nprobe=8", "IVF8,SQ8", "PQ4"])
def test_add_remove_upsert_keep_ids_stable_across_reopen(tmp_path: Path, spec: str) -> None:
    x = unit_vectors(400, DIM)
    root = tmp_path / "idx"
    Index.build(root, passages(400), x, ENC, spec=spec)
    index = Index.open(root)
    assert top_ids(index, x[:20]) == [[f"p{i}"] for i in range(20)] or spec != "flat"

    report = index.remove(["p0", "p1", "missing-id"])
    assert (report.removed, report.missing) == (2, ["missing-id"])
    new = unit_vectors(3, DIM, seed=5)
    report = index.upsert([Passage("p2", "replaced", "T2"), Passage("n1", "new one", ""), Passage("n2", "new two", "")], new, ENC)
    assert (report.added, report.replaced) == (2, 1)

    reopened = Index.open(root)
    assert len(reopened) == 400 - 2 + 2
    got = {hit.id for hits in reopened.search(x[:3], k=50) for hit in hits}
    assert not {"p0", "p1"} & got, "removed passages must never come back"
    [[hit]] = reopened.search(new[0:1], k=1)
    assert (hit.id, hit.text) == ("p2", "replaced")
    assert top_ids(reopened, new[1:3]) == [["n1"], ["n2"]]
    assert reopened.get(["p3"])["p3"].text == "text 3"


def test_hnsw_tombstones_are_compacted(tmp_path: Path) -> None:
    x = unit_vectors(100, DIM)
    index = Index.build(tmp_path / "idx", passages(100), x, ENC, spec="hnsw:M=8")
    index.remove([f"p{i}" for i in range(10)])
    assert index.info()["tombstones"] == 10 and index.info()["vectors"] == 100
    report = index.remove([f"p{i}" for i in range(10, 20)])  # 20% dead -> rebuilt
    assert report.compacted
    info = index.info()
    assert (info["tombstones"], info["vectors"], info["passages"]) == (0, 80, 80)
    assert top_ids(index, x[20:25]) == [[f"p{i}"] for i in range(20, 25)]


def test_refuses_another_embedder(tmp_path: Path) -> None:
    index = Index.build(tmp_path / "idx", passages(10), unit_vectors(10, DIM), ENC)
    wrong_dim = EncoderInfo("other", DIM + 1, True, 64, "f" * 32)
    with pytest.raises(ResourceError, match="dimension 17"):
        index.check_encoder(wrong_dim)
    wrong_weights = EncoderInfo("test-encoder", DIM, True, 64, "0" * 32)
    with pytest.raises(ResourceError, match="not the model that built"):
        index.upsert(passages(1, "z"), unit_vectors(1, DIM), wrong_weights)
    with pytest.raises(ResourceError, match="dimension"):
        index.search(unit_vectors(1, DIM + 3), k=1)


def test_build_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="duplicate id 'p0'"):
        Index.build(tmp_path / "a", passages(2) + passages(1), unit_vectors(3, DIM), ENC)
    with pytest.raises(InputError, match="empty corpus"):
        Index.build(tmp_path / "b", [], np.zeros((0, DIM), np.float32), ENC)
    with pytest.raises(ResourceError, match="dimension 8"):
        Index.build(tmp_path / "c", passages(2), unit_vectors(2, 8), ENC)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "precious.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not a ragkit index"):
        Index.build(tmp_path / "d", passages(2), unit_vectors(2, DIM), ENC)
    assert (tmp_path / "d" / "precious.txt").read_text() == "keep me"
    Index.build(tmp_path / "e", passages(2), unit_vectors(2, DIM), ENC)
    with pytest.raises(UsageError, match="already there"):
        Index.build(tmp_path / "e", passages(2), unit_vectors(2, DIM), ENC)
    with pytest.raises(ResourceError, match="not a ragkit index"):
        Index.open(tmp_path / "nowhere")


def test_artifacts_open_without_ragkit(tmp_path: Path) -> None:
    import sqlite3

    import faiss

    index = Index.build(tmp_path / "idx", passages(20), unit_vectors(20, DIM), ENC)
    [base] = index.manifest["segments"]
    raw = faiss.read_index(str(tmp_path / "idx" / "current" / base["vectors"]))
    assert raw.ntotal == 20 and raw.d == DIM
    rows = sqlite3.connect(tmp_path / "idx" / "current" / base["passages"]).execute("SELECT count(*) FROM passages")
    assert rows.fetchone()[0] == 20
    assert index.verify() == []


def test_failed_write_keeps_previous_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import faiss

    root = tmp_path / "idx"
    x = unit_vectors(50, DIM)
    index = Index.build(root, passages(50), x, ENC)
    before = index.version_dir

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(np, "save", crash)  # a remove writes the delta's deletes file
    with pytest.raises(OSError, match="disk full"):
        index.remove(["p1", "p2"])
    monkeypatch.undo()
    monkeypatch.setattr(faiss, "write_index", crash)  # an add writes the delta's vectors
    with pytest.raises(OSError, match="disk full"):
        index.upsert(passages(2, "new"), unit_vectors(2, DIM, seed=3), ENC)
    monkeypatch.undo()
    # the object and the directory both still hold the complete previous version
    assert len(index) == 50 and top_ids(index, x[1:3]) == [["p1"], ["p2"]]
    reopened = Index.open(root)
    assert reopened.version_dir == before and len(reopened) == 50
    # and the next writer cleans up what the failed one left
    reopened.remove(["p3"])
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".lock")) == ["current", "v000002"]


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np
    from ragkit.index import Index
    from ragkit.io.corpus import Passage
    from ragkit.models.encoder import EncoderInfo
    enc = EncoderInfo("test-encoder", 16, True, 64, "f" * 32)
    root, rounds = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(1)
    index = Index.open(root)
    print("ready", flush=True)
    for r in range(rounds):
        ps = [Passage(f"r{r}-{i}", "x" * 200, "t") for i in range(2000)]
        x = rng.standard_normal((2000, 16)).astype("float32")
        index.upsert(ps, x / np.linalg.norm(x, axis=1, keepdims=True) * 0.5, enc)
    """
)


@pytest.mark.parametrize("delay", [0.3, 0.9, 1.6])
def test_killed_writer_leaves_a_loadable_index(tmp_path: Path, delay: float) -> None:
    root = tmp_path / "idx"
    Index.build(root, passages(100), unit_vectors(100, DIM), ENC)
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(root), "200"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    index = Index.open(root)  # whatever version is current is complete
    assert index.verify() == []
    assert len(index) == 100 + 2000 * (index.manifest["version"] - 1)
    assert top_ids(index, unit_vectors(100, DIM)[:2]) == [["p0"], ["p1"]]
    index.remove(["p5"])  # and it can still be written
    assert len(Index.open(root)) == len(index)
    assert [p.name for p in root.iterdir() if p.name.startswith((".staging", "v"))] == [index.version_dir.name]


def test_small_pq_training_warns_once(tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    Index.build(tmp_path / "idx", passages(300), unit_vectors(300, DIM), ENC, spec="ivf-pq:nlist=4,m=8")
    assert "WARNING clustering" not in capfd.readouterr().err
    assert [r.getMessage() for r in caplog.records if "PQ trained on 300 vectors" in r.getMessage()]


def test_a_refused_end2end_upsert_leaves_the_manifest_alone(tmp_path: Path) -> None:
    index = Index.build(tmp_path / "idx", passages(6), unit_vectors(6, DIM), ENC)
    trained = EncoderInfo(ENC.name, DIM, True, 64, "e" * 32)
    duplicated = [Passage("p0", "x"), Passage("p0", "y")]
    with pytest.raises(InputError, match="duplicate id"):
        index.upsert(duplicated, unit_vectors(2, DIM), trained, adopt_encoder={"step": 1, "slice": "1/1"})
    assert "end2end" not in index.manifest and index.encoder.fingerprint == ENC.fingerprint
    index.upsert([Passage("p0", "x")], unit_vectors(1, DIM), trained, adopt_encoder={"step": 1, "slice": "1/1"})
    assert Index.open(tmp_path / "idx").manifest["end2end"] == {"step": 1, "slice": "1/1"}


@pytest.mark.parametrize("spec,metric", [("hnsw:M=8", "ip"), ("flat", "l2")])
def test_search_ids_agrees_with_search_and_skips_tombstones(tmp_path: Path, spec: str, metric: str) -> None:
    x = unit_vectors(60, DIM)
    index = Index.build(tmp_path / "idx", passages(60), x, ENC, spec=spec, metric=metric)
    index.remove(["p1", "p4"])  # HNSW keeps their vectors as tombstones: both paths must skip them
    queries = x[:6]
    full = [[(h.id, h.score) for h in row] for row in index.search(queries, k=7)]
    ids_only = index.search_ids(queries, k=7)
    assert ids_only == full
    assert all(len(row) == 7 and not {"p1", "p4"} & {pid for pid, _ in row} for row in ids_only)


def test_search_with_vectors_returns_each_hits_stored_vector(tmp_path: Path) -> None:
    x = unit_vectors(30, DIM)
    index = Index.build(tmp_path / "idx", passages(30), x, ENC, spec="flat")
    index.remove(["p2"])
    hits, vectors = index.search_with_vectors(x[:3], 4)
    assert vectors.shape == (3, 4, DIM)
    for query, row, row_vectors in zip(x[:3], hits, vectors):
        assert "p2" not in [h.id for h in row]
        for hit, vector in zip(row, row_vectors):
            np.testing.assert_allclose(vector, x[int(hit.id[1:])], atol=1e-6)
            assert hit.score == pytest.approx(float(query @ vector), abs=1e-5)


def test_a_folder_of_killed_first_build_leftovers_is_an_empty_index_folder(tmp_path: Path) -> None:
    """Issue 17.6: a first build killed before publishing left .lock, staging and an unlinked version
    folder; the retry (no --overwrite) builds there and clears them. Someone's own files still stop it."""
    root = tmp_path / "idx"
    (root / ".staging-v000001-4242").mkdir(parents=True)
    (root / ".staging-v000001-4242" / "seg.faiss").write_bytes(os.urandom(1 << 20))
    (root / "v000001").mkdir()
    (root / ".lock").touch()
    x = unit_vectors(40, DIM, seed=1)
    index = Index.build(root, passages(40), x, ENC)
    assert len(index) == 40
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".staging")) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UsageError, match="is not a ragkit index"):
        Index.build(tmp_path / "mine", passages(40), x, ENC)

