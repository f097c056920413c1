"""GPU paths (run with `pytest -m gpu` on a machine with CUDA and, for Faiss, faiss-gpu)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import unit_vectors

pytestmark = pytest.mark.gpu


def test_encoder_on_cuda_matches_cpu(tiny_encoder_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from ragkit.models.encoder import Encoder

    texts = ["river king", "city of music", "a poet was born"]
    cpu = Encoder(str(tiny_encoder_path), device="cpu").encode(texts)
    gpu = Encoder(str(tiny_encoder_path), device="cuda").encode(texts)
    np.testing.assert_allclose(cpu, gpu, atol=1e-3)


def test_faiss_gpu_flat_matches_cpu(tmp_path: Path) -> None:
    from ragkit.index import Index
    from ragkit.index.vectors import has_gpu
    from ragkit.io.corpus import Passage
    from ragkit.models.encoder import EncoderInfo

    if not has_gpu():
        pytest.skip("Faiss has no GPU support here")
    x = unit_vectors(2000, 32)
    enc = EncoderInfo("t", 32, True, None, "f")
    Index.build(tmp_path / "idx", [Passage(f"p{i}", "t") for i in range(2000)], x, enc, device="cuda")
    cpu = Index.open(tmp_path / "idx")
    gpu = Index.open(tmp_path / "idx", device="cuda")
    assert gpu.device == "cuda"
    q = unit_vectors(10, 32, seed=3)
    assert [[h.id for h in r] for r in cpu.search(q, 5)] == [[h.id for h in r] for r in gpu.search(q, 5)]
