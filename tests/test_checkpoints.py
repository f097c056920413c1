"""Checkpoints a kill cannot leave half-trusted (issue 17.3): marked complete last, resumed from the newest
complete one, corrupted ones refused with exit 4, and a kill -9 harness over real training saves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_passages, write_jsonl
from ragkit.cli import app
from ragkit.errors import ResourceError
from ragkit.train.checkpoints import MANIFEST, mark_complete, problems, resume_checkpoint, rotate

runner = CliRunner()


def fake_checkpoint(run: Path, step: int, *, complete: bool = True) -> Path:
    folder = run / f"checkpoint-{step}"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "weights.safetensors").write_bytes(os.urandom(4096))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (folder / "rng_state.pth").write_bytes(os.urandom(64))
    if complete:
        mark_complete(folder, step)
    return folder


def test_resume_takes_the_newest_complete_checkpoint_and_names_the_skipped_one(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 10)
    half = fake_checkpoint(tmp_path, 12, complete=False)
    (half / "trainer_state.json").unlink()  # killed before Trainer got to its state file
    said: list[str] = []
    assert resume_checkpoint(tmp_path, said.append) == tmp_path / "checkpoint-10"
    assert len(said) == 1 and "checkpoint-12" in said[0] and "checkpoint-10" in said[0]


def test_a_marked_checkpoint_damaged_since_is_refused_naming_the_file(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 4)
    newest = fake_checkpoint(tmp_path, 8)
    weights = newest / "model" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ResourceError, match=r"checkpoint-8 is corrupted: model/weights.safetensors is 100 bytes"):
        resume_checkpoint(tmp_path, print)
    fake_checkpoint(tmp_path / "b", 3)
    rng = tmp_path / "b" / "checkpoint-3" / "rng_state.pth"
    rng.write_bytes(os.urandom(64))  # same size, other bytes: only the checksum sees it
    assert problems(tmp_path / "b" / "checkpoint-3") == ["rng_state.pth does not match its checksum"]
    (tmp_path / "b" / "checkpoint-3" / "trainer_state.json").unlink()
    assert "trainer_state.json is missing" in problems(tmp_path / "b" / "checkpoint-3")


def test_runs_without_manifests_resume_as_before_and_an_empty_run_says_what_to_do(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 5, complete=False)  # a run of a ragkit before manifests
    half = fake_checkpoint(tmp_path, 6, complete=False)
    (half / "trainer_state.json").write_text('{"global_st')
    assert resume_checkpoint(tmp_path, print) == tmp_path / "checkpoint-5"
    with pytest.raises(ResourceError, match="no complete checkpoint") as err:
        resume_checkpoint(tmp_path / "empty", print)
    assert "without --resume" in (err.value.hint or "")


def test_rotation_keeps_the_newest_complete_ones_and_clears_incomplete_leftovers(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 4, complete=False)  # older than nothing kept: a save in progress stays
    fake_checkpoint(tmp_path, 0, complete=False)  # a leftover older than the kept ones goes
    (tmp_path / ".deleting-checkpoint-7").mkdir()  # a delete that a kill interrupted
    rotate(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]


@pytest.fixture(scope="module")
def rag_setup(tmp_path_factory: pytest.TempPathFactory, tiny_encoder_path: Path, tiny_lm_path: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    corpus = write_jsonl(root / "corpus.jsonl", make_passages(30))
    assert runner.invoke(app, ["index", "build", str(corpus), "-o", str(root / "idx"), "--model",
                               str(tiny_encoder_path), "--device", "cpu"]).exit_code == 0
    data = write_jsonl(root / "train.jsonl", [{"question": f"river king {i}", "answers": ["city"]} for i in range(8)])
    return {"index": root / "idx", "data": data, "lm": tiny_lm_path}


def train_args(setup: dict[str, Path], out: Path, *extra: object) -> list[str]:
    return [str(a) for a in ["train", "--arch", "rag", "--data", setup["data"], "--index", setup["index"],
                             "--generator", setup["lm"], "-o", out, "--n-docs", 2, "--batch-size", 2,
                             "--logging-steps", 1, "--device", "cpu", "--save-steps", 1, *extra]]


def test_a_corrupted_checkpoint_is_exit_4_with_a_hint_not_a_traceback(rag_setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert runner.invoke(app, train_args(rag_setup, out, "--max-steps", 2)).exit_code == 0
    assert (out / "checkpoint-2" / MANIFEST).is_file() and (out / "checkpoint-1" / MANIFEST).is_file()
    state = out / "checkpoint-2" / "trainer_state.json"
    state.write_text(state.read_text().replace("2", "3", 1))
    result = runner.invoke(app, train_args(rag_setup, out, "--max-steps", 3, "--resume"))
    assert result.exit_code == 4, result.output
    assert "checkpoint-2 is corrupted: trainer_state.json does not match its checksum" in result.stderr
    assert "move checkpoint-2 aside" in result.stderr
    assert runner.invoke(app, train_args(rag_setup, tmp_path / "none", "--max-steps", 3, "--resume")).exit_code == 4


@pytest.mark.slow
def test_kill_9_while_saving_never_breaks_resume(rag_setup: dict[str, Path], tmp_path: Path) -> None:
    """Killed the moment a checkpoint folder appears (before it is marked), `--resume` continues, every time."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "ragkit.cli", *train_args(rag_setup, out, "--max-steps", 12,
                                                                 "--save-total-limit", 1)]
    kills = 0
    for attempt in range(6):
        proc = subprocess.Popen(command + (["--resume"] if attempt else []), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        before = {p.name for p in out.glob("checkpoint-*")}
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            folders = list(out.glob("checkpoint-*"))
            fresh = [p for p in folders if p.name not in before and not (p / MANIFEST).exists()]
            if fresh and attempt < 5 and any((p / MANIFEST).exists() for p in folders):  # one to resume from
                time.sleep(0.002 * attempt)  # a little further into the save each time
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.002)
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err[-3000:]
    assert proc.returncode == 0, err[-3000:]
    assert kills >= 3
    assert json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())["global_step"] == 12
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-12"]  # rotation finished the job
