"""Out of disk or memory: a full disk in a writer is one line, exit 4, naming the folder, with nothing half-published
(issue 27.2); an index spec that cannot fit in memory is refused before Faiss allocates it (27.3).

Real full disks where this machine lets the tests mount a small tmpfs (root, as here and in CI); injected
ENOSPC where the writer's failure point must be chosen (an add whose new version cannot be written, a training
checkpoint)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import make_passages, run_cli, write_jsonl

RAGKIT = [sys.executable, "-m", "ragkit.cli"]


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 256 KB tmpfs: too small for the tests' shards and indexes, large enough to start writing them."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip() or 'not root'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def one_line_exit_4(done: subprocess.CompletedProcess, folder: Path) -> str:
    assert done.returncode == 4, (done.returncode, done.stderr[-2000:])  # was 135 (SIGBUS) / 1 (internal error)
    error = next(line for line in done.stderr.splitlines() if line.startswith("Error: "))
    assert "no space left" in error and str(folder) in error, error
    assert "Traceback" not in done.stderr
    return error


def test_embed_on_a_full_disk_is_exit_4_not_sigbus(tmp_path: Path, tiny_disk: Path, tiny_encoder_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", make_passages(3000))  # 3000 x 32 float32 = 375 KB of vectors
    out = tiny_disk / "emb"
    done = subprocess.run([*RAGKIT, "embed", str(corpus), "-o", str(out), "-m", str(tiny_encoder_path), "--device", "cpu",
                           "--dtype", "float32"], capture_output=True, text=True, timeout=300)
    one_line_exit_4(done, out)
    assert sorted(p.name for p in out.iterdir()) == []  # nothing was embedded, nothing left behind
    small = write_jsonl(tmp_path / "small.jsonl", make_passages(50))  # the same folder works once it fits
    again = subprocess.run([*RAGKIT, "embed", str(small), "-o", str(out), "-m", str(tiny_encoder_path), "--device", "cpu"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]


def test_index_build_on_a_full_disk_publishes_nothing(tmp_path: Path, tiny_disk: Path, tiny_encoder_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", make_passages(3000))
    index = tiny_disk / "idx"
    done = subprocess.run([*RAGKIT, "index", "build", str(corpus), "-o", str(index), "-m", str(tiny_encoder_path),
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    one_line_exit_4(done, index)
    assert not (index / "CURRENT").exists() and not any(p.name.startswith("v") for p in index.iterdir())


def test_index_add_on_a_full_disk_keeps_the_last_version(tmp_path: Path, tiny_encoder_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", make_passages(40))
    index = tmp_path / "idx"
    assert run_cli("index", "build", corpus, "-o", index, "-m", tiny_encoder_path, "--device", "cpu").exit_code == 0
    before = run_cli("index", "search", index, "-q", "-", "--k", "3", "--device", "cpu", input_="alpha\n").stdout
    more = write_jsonl(tmp_path / "more.jsonl", [dict(p, id=f"new-{i}") for i, p in enumerate(make_passages(10, seed=1))])

    from ragkit.index import draft

    def full(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(draft.Draft, "publish", full)
    result = run_cli("index", "add", index, more, "--device", "cpu")
    assert result.exit_code == 4, result.stderr
    assert "no space left" in result.stderr and str(index) in result.stderr and "last version is intact" in result.stderr
    monkeypatch.undo()
    assert run_cli("index", "search", index, "-q", "-", "--k", "3", "--device", "cpu", input_="alpha\n").stdout == before
    assert not [p for p in index.iterdir() if p.name.startswith(".staging")]  # the staged version went
    assert run_cli("index", "add", index, more, "--device", "cpu").exit_code == 0  # and a retry succeeds


def test_a_full_disk_anywhere_else_is_exit_4_not_an_internal_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The one mapping in handle_errors, for writers that do not name their folder themselves."""
    import sqlite3

    import typer

    from ragkit.commands._common import handle_errors

    for exc in (OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "f")),
                sqlite3.OperationalError("database or disk is full"),
                RuntimeError("Error in faiss::FileIOWriter: fwrite failed: No space left on device")):
        with pytest.raises(typer.Exit) as caught, handle_errors():
            raise exc
        assert caught.value.exit_code == 4, exc


def test_a_training_checkpoint_on_a_full_disk_is_removed_and_named(tmp_path: Path, tiny_encoder_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import Trainer

    rows = [{"query": f"q {p['text']}", "positive": p["text"]} for p in make_passages(16)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    real = Trainer._save_checkpoint

    def full(self, model, trial):  # noqa: ANN001
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        if self.state.global_step >= 4:  # the first checkpoint is written; the second finds the disk full
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, model, trial)

    monkeypatch.setattr(Trainer, "_save_checkpoint", full)
    run = tmp_path / "run"
    result = run_cli("train", "--arch", "embedder", "--embedder", tiny_encoder_path, "--data", data, "-o", run,
                     "--max-steps", 6, "--save-steps", 2, "--batch-size", 4, "--device", "cpu")
    assert result.exit_code == 4, result.stderr[-2000:]
    assert "no space left" in result.stderr and str(run) in result.stderr and "checkpoint-4" in result.stderr
    assert not (run / "checkpoint-4").exists() and (run / "checkpoint-2").is_dir()
    assert json.loads((run / "checkpoint-2" / "ragkit-checkpoint.json").read_text())["step"] == 2


def test_a_spec_that_cannot_fit_in_memory_is_refused_not_oom_killed(tmp_path: Path, tiny_encoder_path: Path) -> None:
    """hnsw:M=100000000 was accepted and grew to 22 GB until the kernel killed it (issue 27.3)."""
    corpus = write_jsonl(tmp_path / "c.jsonl", make_passages(40))
    result = run_cli("index", "build", corpus, "-o", tmp_path / "idx", "-m", tiny_encoder_path, "--device", "cpu",
                     "--spec", "hnsw:M=100000000")
    assert result.exit_code == 2, result.stderr
    assert "more than this machine's memory" in result.stderr and not (tmp_path / "idx" / "CURRENT").exists()


@pytest.mark.parametrize("args", [
    ["index", "plan", "--passages", "1000", "--dim", "8", "--max-memory", "0"],  # ZeroDivisionError before
    ["generate", "-", "--seed", "-1"],
    ["train", "--arch", "embedder", "--data", "x.jsonl", "-o", "run", "--seed", "-1"],  # ValueError before
    ["train", "--arch", "embedder", "--data", "x.jsonl", "-o", "run", "--lr", "inf"],  # trained into NaN, exit 0
    ["train", "--arch", "embedder", "--data", "x.jsonl", "--output", "x.jsonl"],  # FileExistsError, exit 1
])
def test_flags_out_of_range_are_usage_errors_before_any_work(args: list[str], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 27.7-27.8: values that reached a library unchecked are exit 2 naming the flag."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.jsonl").write_text('{"query": "q", "positive": "p"}\n')
    result = run_cli(*args, input_="q\n")
    assert result.exit_code == 2, (result.exit_code, result.stderr[-1500:])
    flag = next(a for a in args if a in ("--max-memory", "--seed", "--lr", "--output"))
    assert flag in result.stderr


def test_more_inverted_lists_than_vectors_is_a_usage_error(tmp_path: Path, tiny_encoder_path: Path) -> None:
    """Issue 27.8: an IVF factory with more lists than training points was Faiss' RuntimeError, exit 1."""
    corpus = write_jsonl(tmp_path / "c.jsonl", make_passages(40))
    result = run_cli("index", "build", corpus, "-o", tmp_path / "idx", "-m", tiny_encoder_path, "--device", "cpu",
                     "--spec", "IVF64,Flat")
    assert result.exit_code == 2, (result.exit_code, result.stderr[-1500:])
    assert "64 inverted lists need at least 64 vectors to train; the corpus has 40" in result.stderr
    assert not (tmp_path / "idx" / "CURRENT").exists()
    assert run_cli("index", "build", corpus, "-o", tmp_path / "idx", "-m", tiny_encoder_path, "--device", "cpu",
                   "--spec", "IVF4,Flat").exit_code == 0
