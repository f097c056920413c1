"""Released Contriever/DPR passage embeddings: imported by id against a passage file, read without pickle."""

from __future__ import annotations

import csv
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ragkit.cli import app
from ragkit.errors import InputError
from ragkit.index.released import read_released

from conftest import make_passages

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def write_tsv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["id", "text", "title"])
        for r in rows:
            writer.writerow([r["id"], r["text"], r.get("title", "")])
    return path


def encode(model: Path, rows: list[dict]) -> np.ndarray:
    from ragkit.models.encoder import Encoder

    enc = Encoder(str(model), device="cpu")
    return enc.encode([f"{r.get('title', '')} {r['text']}" if r.get("title") else r["text"] for r in rows])


def test_contriever_and_dpr_files_build_the_index_a_corpus_build_gives(tmp_path: Path, tiny_encoder_path: Path) -> None:
    rows = make_passages(30)
    tsv = write_tsv(tmp_path / "psgs.tsv", rows)
    vectors = encode(tiny_encoder_path, rows)
    contriever = tmp_path / "contriever"
    contriever.mkdir()
    order = list(range(30))[::-1]  # the files need not follow the passage file's order
    for part, chunk in enumerate((order[:12], order[12:])):
        with open(contriever / f"passages_{part:02d}", "wb") as handle:
            pickle.dump(([rows[i]["id"] for i in chunk], vectors[chunk]), handle)
    dpr = tmp_path / "dpr"
    dpr.mkdir()
    with open(dpr / "wikipedia_passages_0.pkl", "wb") as handle:
        pickle.dump([(f"wiki:{rows[i]['id']}", vectors[i]) for i in range(30)], handle)

    reference = run("index", "build", tsv, "-o", tmp_path / "ref", "-m", tiny_encoder_path, "--device", "cpu")
    assert reference.exit_code == 0, reference.stderr
    query = '{"query": "river king city"}\n'
    expected = json.loads(runner.invoke(app, ["index", "search", str(tmp_path / "ref"), "--k", "5"], input=query).stdout)
    for folder in (contriever, dpr):
        out = tmp_path / f"idx-{folder.name}"
        result = run("index", "build", tsv, "--embeddings", folder, "-m", tiny_encoder_path, "-o", out, "--json",
                     "--device", "cpu")
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["passages"] == 30
        got = json.loads(runner.invoke(app, ["index", "search", str(out), "--k", "5"], input=query).stdout)
        assert [h["id"] for h in got["hits"]] == [h["id"] for h in expected["hits"]]
        assert [h["score"] for h in got["hits"]] == pytest.approx([h["score"] for h in expected["hits"]], abs=1e-5)


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/ragkit-released-exploit-marker")


def test_a_malicious_pickle_is_refused_and_runs_nothing(tmp_path: Path, tiny_encoder_path: Path) -> None:
    MARKER.unlink(missing_ok=True)
    folder = tmp_path / "emb"
    folder.mkdir()
    with open(folder / "passages_00", "wb") as handle:
        pickle.dump((["1"], Exploit()), handle)
    with pytest.raises(InputError, match=r"passages_00.*refused global posix.system"):
        read_released(folder / "passages_00")
    tsv = write_tsv(tmp_path / "psgs.tsv", make_passages(1))
    result = run("index", "build", tsv, "--embeddings", folder, "-m", tiny_encoder_path, "-o", tmp_path / "idx")
    assert result.exit_code == 3 and "passages_00" in result.stderr and "refused global" in result.stderr
    assert not MARKER.exists()
    assert not (tmp_path / "idx" / "current").exists()


@pytest.mark.parametrize("problem,message", [
    ("unknown-id", r"passages_00.*id 'nope'.* not in .*psgs.tsv"),
    ("missing-vector", r"psgs.tsv.*10 passages but 9 embeddings"),
    ("wrong-dim", r"passages_00.*dimension 7"),
    ("not-a-pair", r"passages_00.*expected a pickled"),
    ("non-finite", r"passages_00:4: row 4: the vector is not finite"),  # built with exit 0, then no hits (27.10)
])
def test_bad_released_files_name_the_file(tmp_path: Path, tiny_encoder_path: Path, problem: str, message: str) -> None:
    rows = make_passages(10)
    tsv = write_tsv(tmp_path / "psgs.tsv", rows)
    vectors = encode(tiny_encoder_path, rows)
    ids = [r["id"] for r in rows]
    payload: object = (ids, vectors)
    if problem == "unknown-id":
        payload = (ids[:-1] + ["nope"], vectors)
    elif problem == "missing-vector":
        payload = (ids[:-1], vectors[:-1])
    elif problem == "wrong-dim":
        payload = (ids, np.zeros((10, 7), np.float32))
    elif problem == "not-a-pair":
        payload = {"ids": ids}
    elif problem == "non-finite":
        vectors = vectors.copy()
        vectors[3, 0] = np.nan
        payload = (ids, vectors)
    folder = tmp_path / "emb"
    folder.mkdir()
    with open(folder / "passages_00", "wb") as handle:
        pickle.dump(payload, handle)
    result = run("index", "build", tsv, "--embeddings", folder, "-m", tiny_encoder_path, "-o", tmp_path / "idx")
    assert result.exit_code == 3, result.stderr
    import re

    assert re.search(message, result.stderr), result.stderr


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_every_pickle_protocol_of_an_array_reads(tmp_path: Path, protocol: int) -> None:
    vectors = np.arange(12, dtype=np.float32).reshape(4, 3)
    path = tmp_path / "passages_00"
    path.write_bytes(pickle.dumps((["a", "b", 3, "d"], vectors), protocol=protocol))
    ids, got = read_released(path)
    assert ids == ["a", "b", "3", "d"] and np.array_equal(got, vectors)


def test_released_files_are_held_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 26, stage 7: the import's memory is one file plus the index. The reader's generator kept the last
    file's arrays while it read the next (two 1.5 GB files at once for Contriever's passages_XX)."""
    import weakref

    import ragkit.index.released as released

    for f in range(3):
        with open(tmp_path / f"passages_{f:02d}", "wb") as handle:
            pickle.dump(([f"{f}-{i}" for i in range(10)], np.ones((10, 4), np.float32)), handle, protocol=4)
    refs: list[weakref.ref] = []
    alive_when_read: list[list[bool]] = []
    real = released.read_released

    def spy(path: Path):
        alive_when_read.append([r() is not None for r in refs])
        ids, vectors = real(path)
        refs.append(weakref.ref(vectors))
        return ids, vectors

    monkeypatch.setattr(released, "read_released", spy)
    for _, ids, vectors in released.iter_released(tmp_path):
        del ids, vectors  # as import_released does
    assert alive_when_read == [[], [False], [False, False]]
