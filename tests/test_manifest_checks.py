"""The manifest is checked at open against itself and the Faiss headers; a writer never builds on one that
fails (issue 27.12: a segment pointing at another's vectors opened with duplicate hits, `next_vid: NaN` opened
and broke the next writer, an edited dimension was refused by search but built on by `remove`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from ragkit.errors import ResourceError
from ragkit.index.encoder_info import EncoderInfo
from ragkit.index.index import Index
from ragkit.io.corpus import Passage

DIM = 16
ENCODER = EncoderInfo("t", DIM, True, None, "fp")


def _vectors(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture()
def index(tmp_path: Path) -> Path:
    root = tmp_path / "idx"
    built = Index.build(root, [Passage(f"p{i}", f"text {i}", "") for i in range(40)], _vectors(40, 0), ENCODER)
    built.upsert([Passage(f"n{i}", f"new {i}", "") for i in range(5)], _vectors(5, 1), ENCODER)
    return root


def _edit(root: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = (root / "current").resolve() / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _same_vectors(m: dict[str, Any]) -> None:
    m["segments"][1]["vectors"] = m["segments"][0]["vectors"]


def _nan_vid(m: dict[str, Any]) -> None:
    m["next_vid"] = float("nan")


def _dim(m: dict[str, Any]) -> None:
    m["encoder"]["dim"] = 2 * DIM


def _overlap(m: dict[str, Any]) -> None:
    m["segments"][1]["vid_min"] = m["segments"][0]["vid_max"]


def _rows(m: dict[str, Any]) -> None:
    m["segments"][0]["rows"] = 39


@pytest.mark.parametrize("change, field", [
    (_same_vectors, "segments[1].vectors"),
    (_nan_vid, "next_vid"),
    (_dim, "encoder.dim"),
    (_overlap, "segments[1].vid_min"),
    (_rows, "segments[0].rows"),
])
def test_a_manifest_that_cannot_be_right_is_refused_at_open_and_by_writers(index: Path, change: Callable,
                                                                        field: str) -> None:
    from typer.testing import CliRunner

    from ragkit.cli import app

    _edit(index, change)
    with pytest.raises(ResourceError) as caught:
        Index.open(index)
    assert f"field '{field}'" in str(caught.value)
    version = (index / "current").resolve()
    result = CliRunner().invoke(app, ["index", "remove", str(index), "--ids", "p1"])
    assert result.exit_code == 4 and f"field '{field}'" in result.output, result.output
    assert (index / "current").resolve() == version  # nothing was built on it


def test_an_untouched_manifest_opens(index: Path) -> None:
    opened = Index.open(index)
    assert len(opened) == 45 and opened.search_ids(_vectors(1, 1), 1)[0][0][0] == "n0"
