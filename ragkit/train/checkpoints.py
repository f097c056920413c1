"""Training checkpoints that a kill cannot leave half-trusted.

Trainer writes `checkpoint-N/` file by file, so a process killed while saving leaves a folder that looks
like a checkpoint and is not one, and `--resume` (Trainer's `get_last_checkpoint`: the highest N) picks it.
ragkit marks a checkpoint complete only after every rank has written it and its files are flushed: a
manifest (`ragkit-checkpoint.json`) of each file's size, and the sha256 of the small ones (trainer state,
RNG states, scheduler: what a bit flip would silently change). Resume takes the newest complete
checkpoint, says which incomplete ones it skipped, and refuses (exit 4) one whose files no longer match
its manifest. Rotation (`--save-total-limit`) runs only after the new checkpoint is marked, and deletes by
renaming first, so no kill leaves fewer complete checkpoints than before.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from ragkit.errors import ResourceError
from ragkit.io.atomic import HASH_ON_READ_BYTES, fsync_dir, fsync_file, sha256_file, write_json

MANIFEST = "ragkit-checkpoint.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """`checkpoint-N` folders of a run, newest (highest N) first."""
    if not run.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def mark_complete(folder: Path, step: int) -> None:
    """Flush every file of `folder` and write its manifest last (atomically): from then on it is a checkpoint."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    files = {}
    for path in paths:
        fsync_file(path)
        size = path.stat().st_size
        entry: dict[str, object] = {"size": size}
        if size <= HASH_ON_READ_BYTES:
            entry["sha256"] = sha256_file(path)
        files[path.relative_to(folder).as_posix()] = entry
    for sub in {folder, *(p.parent for p in paths)}:
        fsync_dir(sub)
    write_json(folder / MANIFEST, {"format": 1, "step": step, "files": files})


def problems(folder: Path) -> list[str]:
    """What no longer matches `folder`'s manifest (empty: intact). Raises FileNotFoundError without one."""
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    found = []
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            found.append(f"{name} is missing")
        elif path.stat().st_size != entry["size"]:
            found.append(f"{name} is {path.stat().st_size} bytes, expected {entry['size']} (truncated?)")
        elif "sha256" in entry and sha256_file(path) != entry["sha256"]:
            found.append(f"{name} does not match its checksum")
    return found


def _legacy_complete(folder: Path) -> bool:
    """A checkpoint of a ragkit before manifests: whole if Trainer got as far as its state file (written last)."""
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def _complete(folder: Path, run_has_manifests: bool) -> bool:
    """Marked complete; or, in a run of a ragkit before manifests (none has one), whole by its state file."""
    return (folder / MANIFEST).is_file() or (not run_has_manifests and _legacy_complete(folder))


def resume_checkpoint(run: Path, warn: Callable[[str], None]) -> Path:
    """The checkpoint `--resume` continues from: the newest complete one; incomplete ones are skipped with
    a warning naming them, a complete one that was damaged since is exit 4."""
    found = checkpoints(run)
    marked = any((p / MANIFEST).is_file() for _, p in found)
    skipped = []
    for _, folder in found:
        if (folder / MANIFEST).is_file():
            try:
                damage = problems(folder)
            except (ValueError, KeyError, TypeError) as exc:
                damage = [f"{MANIFEST} is unreadable ({exc})"]
            if damage:
                raise ResourceError(f"checkpoint {folder} is corrupted: {'; '.join(damage[:3])}",
                                    hint=f"move {folder.name} aside to resume from the checkpoint before it")
            chosen = folder
        elif _complete(folder, marked):
            chosen = folder
        else:
            skipped.append(folder.name)
            continue
        if skipped:
            warn(f"warning: skipped incomplete checkpoint(s) {', '.join(skipped)} (killed while saving?); "
                 f"resuming from {chosen.name}")
        return chosen
    detail = f" (incomplete: {', '.join(skipped)})" if skipped else ""
    raise ResourceError(f"--resume: no complete checkpoint in {run}{detail}",
                        hint="run without --resume to start afresh")


def rotate(run: Path, keep: int | None, protect: Path | None = None) -> None:
    """Keep the `keep` newest complete checkpoints (and `protect`, the best one so far under validation); drop
    older ones and incomplete leftovers older than them.

    Deleting renames first (`.deleting-checkpoint-N`), so a kill mid-delete never leaves a partial folder
    with a checkpoint's name; the next rotation finishes the job."""
    for leftover in run.glob(".deleting-checkpoint-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if not keep:
        return
    found = checkpoints(run)
    marked = any((p / MANIFEST).is_file() for _, p in found)
    complete = [(step, p) for step, p in found if _complete(p, marked)]
    if not complete:
        return
    kept = {p for _, p in complete[:keep]} | ({protect} if protect is not None else set())
    oldest_kept = min(step for step, _ in complete[:keep])
    whole = {p for _, p in complete}
    for step, folder in found:
        if folder not in kept and (step < oldest_kept or folder in whole):
            doomed = run / f".deleting-{folder.name}"
            with contextlib.suppress(OSError):
                os.replace(folder, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
