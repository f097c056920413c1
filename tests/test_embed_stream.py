"""`ragkit embed` streams its shard, checkpoints, and resumes to the same bytes after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_passages, write_jsonl

RAGKIT = [sys.executable, "-m", "ragkit.cli"]


def embed(corpus: Path, out: Path, model: Path, *extra: object) -> subprocess.Popen:
    return subprocess.Popen([*RAGKIT, "embed", str(corpus), "-o", str(out), "-m", str(model), "--device", "cpu",
                             "--checkpoint-rows", "200", *map(str, extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def test_killed_embed_resumes_to_the_bytes_of_an_uninterrupted_run(tmp_path: Path, tiny_encoder_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_passages(3000))
    whole = embed(corpus, tmp_path / "whole", tiny_encoder_path, "--shard-id", 1, "--num-shards", 2)
    assert whole.wait(timeout=300) == 0, whole.stderr.read()

    killed_at = None
    for attempt in range(2):  # kill once mid-shard (after some checkpoints), then let it finish
        proc = embed(corpus, tmp_path / "resumed", tiny_encoder_path, "--shard-id", 1, "--num-shards", 2)
        if attempt == 0:
            progress = tmp_path / "resumed" / ".progress-00001-of-00002.json"
            deadline = time.time() + 120
            while time.time() < deadline:
                if progress.exists() and json.loads(progress.read_text())["rows_done"] >= 400:
                    break
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed_at = json.loads(progress.read_text())["rows_done"]
            assert not (tmp_path / "resumed" / "shard-00001-of-00002.json").exists()
        else:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
            assert f"resuming shard 1/2: {killed_at} of 1500" in err.replace("\n", " ")
    assert 0 < killed_at < 1500
    assert files(tmp_path / "resumed") == files(tmp_path / "whole")
    assert not list((tmp_path / "resumed").glob(".*"))  # partials and progress are gone


def test_changed_arguments_start_over(tmp_path: Path, tiny_encoder_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_passages(500))
    out = tmp_path / "emb"
    out.mkdir()
    (out / ".progress-00000-of-00001.json").write_text(json.dumps({"identity": {"other": 1}, "rows_done": 400,
                                                                    "passages_bytes": 5}))
    (out / ".embeddings-00000-of-00001.npy.partial").write_bytes(b"junk")
    (out / ".passages-00000-of-00001.jsonl.partial").write_bytes(b"junk")
    proc = embed(corpus, out, tiny_encoder_path, "--dtype", "float32")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "resuming" not in err
    import numpy as np

    assert np.load(out / "embeddings-00000-of-00001.npy").shape == (500, 32)
    assert len((out / "passages-00000-of-00001.jsonl").read_text().splitlines()) == 500


PEAK = """
import json, sys
from ragkit.embeddings import embed_shard
from ragkit.models.encoder import Encoder
embed_shard(Encoder(sys.argv[1], device="cpu"), sys.argv[2], sys.argv[3], checkpoint_rows=500)
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"peak": peak}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_embed_memory_does_not_grow_with_the_corpus(tmp_path: Path, tiny_encoder_path: Path) -> None:
    peaks = {}
    for n in (2_000, 16_000):
        rows = [{"id": f"d{i}", "text": "word " * 120 + str(i)} for i in range(n)]  # ~600 bytes each
        corpus = write_jsonl(tmp_path / f"c{n}.jsonl", rows)
        out = subprocess.run([sys.executable, "-c", PEAK, str(tiny_encoder_path), str(corpus), str(tmp_path / f"e{n}")],
                             capture_output=True, text=True, check=True)
        peaks[n] = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    # 14,000 more passages of ~600 bytes are ~20 MB held as Python objects (before: all of them were, twice)
    assert peaks[16_000] - peaks[2_000] < 6 * 2**20, peaks  # measured: ~1 MB


@pytest.mark.slow
def test_embed_on_ray_writes_the_shards_one_process_writes(tmp_path: Path, tiny_encoder_path: Path) -> None:
    pytest.importorskip("ray")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_passages(700))
    for shard in range(3):
        proc = embed(corpus, tmp_path / "single", tiny_encoder_path, "--shard-id", shard, "--num-shards", 3)
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    proc = embed(corpus, tmp_path / "ray", tiny_encoder_path, "--num-shards", 3, "--ray", "--ray-actors", 2)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert files(tmp_path / "ray") == files(tmp_path / "single")
    proc = embed(corpus, tmp_path / "bad", tiny_encoder_path, "--num-shards", 3, "--ray", "--shard-id", 1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "leave out --shard-id" in err


def test_embed_refuses_a_repeated_id_before_loading_the_model(tmp_path: Path) -> None:
    """Issue 27.9: `embed` wrote shards with a repeated id that `index build --embeddings` refused only after
    every shard was embedded. Refused when the corpus is counted, before the model loads (the model named
    here does not exist, and the error is about the id, exit 3)."""
    from typer.testing import CliRunner

    from ragkit.cli import app

    corpus = tmp_path / "dup.jsonl"
    corpus.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n{"id": "a", "text": "z"}\n')
    result = CliRunner().invoke(app, ["embed", str(corpus), "-o", str(tmp_path / "emb"), "-m",
                                      str(tmp_path / "no-model"), "--device", "cpu"])
    assert result.exit_code == 3, result.output
    assert "dup.jsonl:3: field 'id': duplicate id 'a' (first at line 1)" in result.output
    assert not list((tmp_path / "emb").glob("*.npy")) if (tmp_path / "emb").exists() else True


def test_count_passages_counts_and_takes_distinct_ids(tmp_path: Path) -> None:
    from ragkit.embeddings import count_passages

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(f'{{"id": "p{i}", "text": "t"}}\n' for i in range(1000)))
    assert count_passages(corpus) == 1000
