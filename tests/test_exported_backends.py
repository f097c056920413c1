"""Encoder --backend onnx / onnx-int8 / openvino: the transformer exported once, run by the engine, the rest
sentence-transformers' own modules; vectors checked against PyTorch's on texts of many lengths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_passages, run_cli, write_jsonl

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

FLOAT_BACKENDS = ("onnx", "openvino")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RAGKIT_HOME", str(tmp_path / "cache"))  # exports land here, not in the user's cache
    return tmp_path / "cache" / "exports"


def texts_of_many_lengths(n: int = 23) -> list[str]:
    """1 to ~90 words (the tiny encoder reads 64 tokens): lengths the export never saw, some truncated."""
    passages = make_passages(n, seed=3)
    return [" ".join((p["text"] + " " + p["title"]).split() * (1 + i % 8))[: 20 + 25 * i] for i, p in enumerate(passages)]


def has_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


APPROXIMATE = {"onnx-int8": 0.95, "openvino-bf16": 0.99, "openvino-int8": 0.95}  # least cosine to PyTorch's vectors


@pytest.mark.parametrize("backend", ["onnx", "onnx-int8", "openvino", "openvino-int8",
                                     pytest.param("openvino-bf16", marks=pytest.mark.skipif(not has_bf16(), reason="no bf16 CPU"))])
def test_exported_backend_embeds_as_pytorch_does(backend: str, tiny_encoder_path: Path, cache: Path) -> None:
    from ragkit.models.encoder import Encoder

    texts = texts_of_many_lengths()
    plain = Encoder(str(tiny_encoder_path), device="cpu")
    expected = plain.encode(texts, batch_size=5)
    engine = Encoder(str(tiny_encoder_path), device="cpu", backend=backend)
    assert engine.info == plain.info  # same fingerprint: an index built on one backend accepts the other's queries
    # batches of 1, 5 and all: every batch and sequence size the engine sees is new to it
    for batch_size in (1, 5, 64):
        got = engine.encode(texts, batch_size=batch_size)
        assert got.shape == expected.shape and got.dtype == np.float32
        cosine = (got * expected).sum(axis=1)
        if backend in APPROXIMATE:
            assert cosine.min() > APPROXIMATE[backend] and not np.allclose(got, expected, atol=1e-4)  # not the float path
        else:
            np.testing.assert_allclose(got, expected, atol=2e-5)
    assert plain.encode(texts, batch_size=5).tolist() == expected.tolist()  # the cached PyTorch model is untouched
    (export,) = cache.iterdir()
    meta = json.loads((export / "export.json").read_text())
    assert meta["export"] == backend.removesuffix("-bf16") and meta["fingerprint"] and {"input_ids", "attention_mask"} <= set(meta["inputs"])


def test_an_export_is_made_once_and_reused(tiny_encoder_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ragkit.models import exported
    from ragkit.models.encoder import Encoder

    first = Encoder(str(tiny_encoder_path), device="cpu", backend="openvino").encode(["the river city"])
    (folder,) = cache.iterdir()
    inode = (folder / "model.xml").stat().st_ino

    def no_export(*_: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(exported, "_export_openvino", no_export)
    again = Encoder(str(tiny_encoder_path), device="cpu", backend="openvino").encode(["the river city"])
    assert again.tolist() == first.tolist() and (folder / "model.xml").stat().st_ino == inode
    # other weights are another export
    from conftest import build_tiny_encoder

    other = build_tiny_encoder(cache.parent.parent / "other", seed=5)
    monkeypatch.undo()
    monkeypatch.setenv("RAGKIT_HOME", str(cache.parent))
    Encoder(str(other), device="cpu", backend="openvino")
    assert len(list(cache.iterdir())) == 2


def test_an_export_that_disagrees_with_pytorch_is_refused_and_not_cached(tiny_encoder_path: Path, cache: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from ragkit.errors import ResourceError
    from ragkit.models import exported
    from ragkit.models.encoder import Encoder

    strict = dataclasses.replace(exported.EXPORTED_BACKENDS["onnx-int8"], min_cosine=1.5)
    monkeypatch.setitem(exported.EXPORTED_BACKENDS, "onnx-int8", strict)
    with pytest.raises(ResourceError, match="embeds the probe texts at cosine"):
        Encoder(str(tiny_encoder_path), device="cpu", backend="onnx-int8")
    assert not cache.exists() or not any(p.name.startswith("onnx-int8") for p in cache.iterdir())


def test_a_damaged_export_is_named_with_the_way_out(tiny_encoder_path: Path, cache: Path) -> None:
    from ragkit.errors import ResourceError
    from ragkit.models.encoder import Encoder

    Encoder(str(tiny_encoder_path), device="cpu", backend="onnx")
    (folder,) = cache.iterdir()
    (folder / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(ResourceError) as caught:
        Encoder(str(tiny_encoder_path), device="cpu", backend="onnx")
    assert str(folder) in caught.value.message and "Delete" in caught.value.hint


def test_missing_engine_and_wrong_device_are_clear_errors(tiny_encoder_path: Path, tmp_path: Path, cache: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_passages(5))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    missing = run_cli("embed", corpus, "-m", tiny_encoder_path, "-o", tmp_path / "vec", "--backend", "openvino")
    assert missing.exit_code == 4 and "needs openvino" in missing.stderr and "ragkit[openvino]" in missing.stderr
    monkeypatch.undo()
    wrong = run_cli("embed", corpus, "-m", tiny_encoder_path, "-o", tmp_path / "vec", "--backend", "onnx", "--device", "mps")
    assert wrong.exit_code == 2 and "runs on the CPU" in wrong.stderr
    unknown = run_cli("embed", corpus, "-m", tiny_encoder_path, "-o", tmp_path / "vec", "--backend", "tensorrt")
    assert unknown.exit_code == 2 and "expected one of torch, int8, onnx, onnx-int8, openvino, openvino-bf16" in unknown.stderr

    import openvino

    class NoBf16Core(openvino.Core):
        def get_property(self, device: str, name: str):  # a CPU without AVX-512 BF16 / AMX
            value = super().get_property(device, name)
            return [c for c in value if c != "BF16"] if name == "OPTIMIZATION_CAPABILITIES" else value

    monkeypatch.setattr(openvino, "Core", NoBf16Core)
    no_bf16 = run_cli("embed", corpus, "-m", tiny_encoder_path, "-o", tmp_path / "vec", "--backend", "openvino-bf16")
    assert no_bf16.exit_code == 4 and "no bfloat16 arithmetic" in no_bf16.stderr  # refused, not silently float32


def test_index_built_on_torch_searched_on_openvino_gives_the_same_hits(tiny_encoder_path: Path, tmp_path: Path,
                                                                     cache: Path) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_passages(60))
    index = tmp_path / "idx"
    built = run_cli("index", "build", corpus, "-o", index, "-m", tiny_encoder_path, "--backend", "onnx")
    assert built.exit_code == 0, built.stderr
    queries = "".join(json.dumps({"id": f"q{i}", "query": p["text"]}) + "\n" for i, p in enumerate(make_passages(8, seed=9)))
    rows = {}
    for backend in ("torch", "openvino"):
        out = run_cli("index", "search", index, "--k", "5", "--backend", backend, input_=queries)
        assert out.exit_code == 0, out.stderr
        rows[backend] = [json.loads(line) for line in out.stdout.splitlines()]  # stdout is JSONL only
    for a, b in zip(rows["torch"], rows["openvino"]):
        assert [h["id"] for h in a["hits"]] == [h["id"] for h in b["hits"]]
        np.testing.assert_allclose([h["score"] for h in a["hits"]], [h["score"] for h in b["hits"]], atol=1e-4)


def test_openvino_int8_is_calibrated_once_on_the_first_texts_then_reused(tiny_encoder_path: Path, cache: Path) -> None:
    import hashlib

    from ragkit.models.encoder import Encoder

    texts = texts_of_many_lengths(40)
    first = Encoder(str(tiny_encoder_path), device="cpu", backend="openvino-int8")
    assert not cache.exists()  # nothing to calibrate on yet: exported on the first encode
    vectors = first.encode(texts, block_size=16)  # calibrated on the first block only
    (folder,) = cache.iterdir()
    calibration = json.loads((folder / "export.json").read_text())["calibration"]
    assert calibration == {"texts": 16, "sha256": hashlib.sha256("\x00".join(texts[:16]).encode()).hexdigest()}
    again = Encoder(str(tiny_encoder_path), device="cpu", backend="openvino-int8")
    assert type(again.model[0]).__name__ == "EngineTransformer"  # loaded from the cache at once
    np.testing.assert_allclose(again.encode(texts, block_size=16), vectors, atol=1e-6)  # same calibration, same vectors


def test_openvino_int8_first_used_on_an_index_calibrates_on_its_passages(tiny_encoder_path: Path, tmp_path: Path,
                                                                        cache: Path) -> None:
    import hashlib

    from ragkit.index import Index

    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_passages(120))
    index = tmp_path / "idx"
    assert run_cli("index", "build", corpus, "-o", index, "-m", tiny_encoder_path).exit_code == 0
    out = run_cli("index", "search", index, "--k", "3", "--backend", "openvino-int8", input_="city river\n")
    assert out.exit_code == 0, out.stderr
    assert len(json.loads(out.stdout)["hits"]) == 3
    (folder,) = cache.iterdir()
    passages = [p.embedding_text() for _, p in Index.open(index).iter_passages()]  # not the query
    digest = hashlib.sha256("\x00".join(passages).encode()).hexdigest()
    assert json.loads((folder / "export.json").read_text())["calibration"] == {"texts": 120, "sha256": digest}


def test_openvino_exports_send_no_telemetry(tiny_encoder_path: Path, tmp_path: Path) -> None:
    """OpenVINO's converter and NNCF report to Google Analytics when no consent file exists (they create
    ~/intel/openvino_ga_cid first): an export in a fresh home must leave none."""
    import os
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}  # CI hosts decline anyway
    env.update(HOME=str(home), RAGKIT_HOME=str(tmp_path / "cache"))
    code = ("import sys; from ragkit.models.encoder import Encoder; "
            "Encoder(sys.argv[1], device='cpu', backend='openvino-int8').encode(sys.argv[2].split('|'))")
    done = subprocess.run([sys.executable, "-c", code, str(tiny_encoder_path), "|".join(texts_of_many_lengths())],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert any((tmp_path / "cache" / "exports").iterdir())  # it did export (and calibrate through NNCF)
    assert not (home / "intel").exists()


def test_openvino_int8_calibrated_on_too_little_is_refused_with_the_way_out(tiny_encoder_path: Path, cache: Path) -> None:
    from ragkit.errors import ResourceError
    from ragkit.models.encoder import Encoder

    encoder = Encoder(str(tiny_encoder_path), device="cpu", backend="openvino-int8")
    with pytest.raises(ResourceError) as caught:
        encoder.encode(["the", "a"])  # two one-word texts cannot set activation ranges
    assert "calibrated on 2 texts" in caught.value.hint and not cache.exists() or not any(cache.iterdir())


@pytest.mark.slow
def test_embed_on_ray_with_openvino_int8_writes_the_shards_one_process_writes(tiny_encoder_path: Path, tmp_path: Path,
                                                                              cache: Path) -> None:
    """Ray actors share the one export (calibrated on the first block of whoever exports first), so the
    shards are the bytes that single-process --shard-id runs write."""
    pytest.importorskip("ray")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": f"d{i}", "text": t}
                                                      for i, t in enumerate(texts_of_many_lengths(23) * 20)])
    common = ["-m", tiny_encoder_path, "--device", "cpu", "--num-shards", 3, "--backend", "openvino-int8"]
    for shard in range(3):
        done = run_cli("embed", corpus, "-o", tmp_path / "single", *common, "--shard-id", shard)
        assert done.exit_code == 0, done.stderr
    # in its own process, as a user runs it: the private Ray ends with that driver, not with the test session
    import os
    import subprocess
    import sys

    ray = subprocess.run([sys.executable, "-m", "ragkit.cli", "embed", str(corpus), "-o", str(tmp_path / "ray"),
                          *map(str, common), "--ray", "--ray-actors", "2"], capture_output=True, text=True,
                         timeout=600, env=dict(os.environ))
    assert ray.returncode == 0, ray.stderr[-2000:]
    shards = sorted(p.name for p in (tmp_path / "single").iterdir() if p.suffix == ".npy")
    assert len(shards) == 3 and len(list(cache.iterdir())) == 1
    for name in shards:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "single" / name).read_bytes()
