"""Issue 17, points 7, 9, 10: refuse before the expensive work, concurrent writers lose nothing, a model
recorded by an index resolves from any directory, an unreachable hub fails in seconds."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_passages, unit_vectors, write_jsonl
from ragkit.cli import app
from ragkit.index import Index
from ragkit.io.corpus import Passage
from ragkit.models.encoder import EncoderInfo

runner = CliRunner()
RAGKIT = [sys.executable, "-m", "ragkit.cli"]
ENC = EncoderInfo("test-encoder", 16, True, 64, "f" * 32)


def run(*args: object, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def passages(n: int, prefix: str = "p") -> list[Passage]:
    return [Passage(f"{prefix}{i}", f"text {prefix} {i}") for i in range(n)]


def test_a_change_published_by_another_writer_meanwhile_is_rebased_not_lost(tmp_path: Path) -> None:
    Index.build(tmp_path / "idx", passages(30), unit_vectors(30, 16, seed=0), ENC)
    first, second = Index.open(tmp_path / "idx"), Index.open(tmp_path / "idx")
    first.upsert(passages(5, "a"), unit_vectors(5, 16, seed=1), ENC)
    second.upsert(passages(5, "b"), unit_vectors(5, 16, seed=2), ENC)  # opened before the first published
    second.remove(["p0"])
    final = Index.open(tmp_path / "idx")
    ids = {h.id for row in final.search(unit_vectors(1, 16, seed=3), 100) for h in row}
    assert len(final) == 39 and {"a0", "a4", "b0", "b4"} <= ids and "p0" not in ids


def test_a_busy_index_is_exit_4_at_once_naming_the_holder_and_wait_queues(tmp_path: Path, tiny_encoder_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", make_passages(10))
    assert run("index", "build", corpus, "-o", tmp_path / "idx", "-m", tiny_encoder_path, "--device", "cpu").exit_code == 0
    extra = write_jsonl(tmp_path / "new.jsonl", [{"id": "n1", "text": "new passage"}])
    fd = os.open(tmp_path / "idx" / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another writer, mid-change
    os.pwrite(fd, b"4242\n", 0)
    try:
        began = time.monotonic()
        result = run("index", "add", tmp_path / "idx", extra, "--device", "cpu")
        assert result.exit_code == 4 and time.monotonic() - began < 5
        assert "pid 4242" in result.stderr and "--wait" in result.stderr
        queued = subprocess.Popen([*RAGKIT, "index", "add", str(tmp_path / "idx"), str(extra), "--device", "cpu",
                                   "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        assert queued.poll() is None  # queued behind the lock
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    _, err = queued.communicate(timeout=120)
    assert queued.returncode == 0, err
    assert "waiting for it" in err and len(Index.open(tmp_path / "idx")) == 11


def test_build_refuses_a_bad_target_before_loading_a_model(tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", make_passages(5))
    missing_model = "no-such-org/no-such-model"  # would take a minute of retries if it were loaded first
    for args, message in [(["-o", corpus], "is not a directory"), (["-o", tmp_path / "x", "--metric", "cos"], "--metric")]:
        began = time.monotonic()
        result = run("index", "build", corpus, *args, "-m", missing_model)
        assert result.exit_code == 2 and message in result.stderr and time.monotonic() - began < 5


def test_a_hub_id_not_cached_fails_in_seconds_when_the_hub_cannot_be_reached(tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", make_passages(5))
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    began = time.monotonic()
    out = subprocess.run([*RAGKIT, "index", "build", str(corpus), "-o", str(tmp_path / "idx"), "-m", "org/model",
                          "--device", "cpu"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 4, out.stderr
    assert "not in the Hugging Face cache" in out.stderr and "127.0.0.1:9" in out.stderr
    assert time.monotonic() - began < 30  # was 75 s of retries; most of this is importing torch


def test_an_index_built_with_a_relative_model_path_works_from_another_directory(tmp_path: Path, tiny_encoder_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", make_passages(10))
    monkeypatch.chdir(tiny_encoder_path.parent)
    assert run("index", "build", corpus, "-o", tmp_path / "idx", "-m", tiny_encoder_path.name, "--device", "cpu").exit_code == 0
    monkeypatch.chdir(tmp_path)
    assert Index.open(tmp_path / "idx").encoder.name == str(tiny_encoder_path.resolve())
    result = run("index", "search", tmp_path / "idx", "-q", "-", "--device", "cpu", input="river\n")
    assert result.exit_code == 0, result.stderr
    assert run("index", "add", tmp_path / "idx", write_jsonl(tmp_path / "n.jsonl", [{"id": "n", "text": "x"}]),
               "--device", "cpu").exit_code == 0


def test_memory_follows_the_index_not_k_or_the_query_length(tmp_path: Path, tiny_encoder_path: Path) -> None:
    """17.11: --k 10^9 on a 30-passage index (dense and BM25) answers with the 30; a 4 MB query is cut to
    what the embedder reads instead of being tokenised whole."""
    import resource

    from ragkit.index.sparse import SparseConfig
    from ragkit.models.encoder import Encoder

    index = Index.build(tmp_path / "idx", passages(30), unit_vectors(30, 16, seed=0), ENC)
    index.add_sparse(SparseConfig())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert len(index.search(unit_vectors(2, 16, seed=1), 10**9)[0]) == 30
    assert len(index.search_sparse(["text p 3", "text"], 10**9)[1]) == 30
    encoder = Encoder(str(tiny_encoder_path), device="cpu")
    said: list[str] = []
    import ragkit.console

    original = ragkit.console.info
    ragkit.console.info = said.append
    try:
        began = time.monotonic()
        long = encoder.encode_queries(["river " * 700_000])
        assert time.monotonic() - began < 10
    finally:
        ragkit.console.info = original
    import numpy as np

    # the cut changes nothing the embedder reads: it truncates "river " x 100 to the same tokens
    assert len("river " * 100) < 64 * encoder.CHARS_PER_TOKEN_BOUND and encoder.model.max_seq_length <= 64
    np.testing.assert_allclose(long, encoder.encode_queries(["river " * 100]), atol=1e-5)
    assert said and "was cut to" in said[0]
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 < 600 * 2**20
