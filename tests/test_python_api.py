"""The public Python API: lazy top-level names, and every example of docs/python-api.md run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def test_import_ragkit_is_cheap_and_exports_the_api() -> None:
    code = ("import sys, ragkit\nassert 'torch' not in sys.modules and 'faiss' not in sys.modules\n"
            "from ragkit import Index, Retriever, Encoder, Passage, Hit, RetrievalMode, SparseConfig\n"
            "from ragkit.index import Index as I\nassert Index is I\nprint(sorted(ragkit.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        import ragkit

        ragkit.Nope  # noqa: B018


def test_the_python_api_doc_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name} block {i + 1}", "exec"), namespace)  # noqa: S102  (our own docs)
    assert (tmp_path / "capitals-index" / "current").exists()
