"""Ray actors (a private local Ray, 2 CPUs) return the same hits as the in-process index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ragkit.index import Index
from ragkit.io.corpus import Passage
from ragkit.models.encoder import EncoderInfo

from conftest import unit_vectors

ray = pytest.importorskip("ray")
ENC = EncoderInfo("t", 16, True, None, "f" * 32)


@pytest.fixture(scope="module")
def indexes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ray")
    x = unit_vectors(200, 16)
    ps = [Passage(f"p{i}", f"text {i}", f"t{i}") for i in range(200)]
    Index.build(root / "all", ps, x, ENC)
    Index.build(root / "a", ps[:100], x[:100], ENC)
    Index.build(root / "b", ps[100:], x[100:], ENC)
    return {"all": root / "all", "a": root / "a", "b": root / "b"}


@pytest.fixture(scope="module")
def local_ray():
    from ragkit.retrieval.ray_retriever import start_ray

    start_ray(num_cpus=2)
    yield
    ray.shutdown()


def as_pairs(hits):
    return [[(h.id, round(h.score, 5), h.rank) for h in row] for row in hits]


def test_replicas_and_shards_match_in_process(indexes: dict[str, Path], local_ray: None) -> None:
    from ragkit.retrieval.ray_retriever import RayIndexClient

    q = unit_vectors(6, 16, seed=4)
    expected_hits, expected_vecs = Index.open(indexes["all"]).search_with_vectors(q, 7)
    replicas = RayIndexClient([indexes["all"]], mode="replicas", num_workers=2, cpus_per_worker=0.5)
    for _ in range(3):  # round-robin over both actors
        hits, vecs = replicas.search(q, 7, with_vectors=True)
        assert as_pairs(hits) == as_pairs(expected_hits)
        np.testing.assert_allclose(vecs, expected_vecs, atol=1e-6)
    shards = RayIndexClient([indexes["a"], indexes["b"]], mode="shards", cpus_per_worker=0.5)
    hits, vecs = shards.search(q, 7, with_vectors=True)
    assert as_pairs(hits) == as_pairs(expected_hits)
    np.testing.assert_allclose(vecs, expected_vecs, atol=1e-6)
    replicas.shutdown()
    shards.shutdown()


def test_processes_of_one_job_share_named_actors(indexes: dict[str, Path], local_ray: None) -> None:
    """Two clients (in this process, and in another one connected through RAY_ADDRESS) with the same job
    name use the same actors, instead of starting one set each."""
    import os
    import subprocess
    import sys

    from ragkit.retrieval.ray_retriever import RayIndexClient

    name = RayIndexClient.job_name([indexes["all"]], "replicas", 2)
    first = RayIndexClient([indexes["all"]], num_workers=2, cpus_per_worker=0.1, name=name)
    second = RayIndexClient([indexes["all"]], num_workers=2, cpus_per_worker=0.1, name=name)
    ids = [w._actor_id.hex() for w in first.workers]
    assert [w._actor_id.hex() for w in second.workers] == ids and len(set(ids)) == 2
    other = RayIndexClient([indexes["all"]], num_workers=1, cpus_per_worker=0.1, name=name + "-other")
    assert other.workers[0]._actor_id.hex() not in ids
    code = ("import sys; from ragkit.retrieval.ray_retriever import RayIndexClient; "
            f"c = RayIndexClient([sys.argv[1]], num_workers=2, cpus_per_worker=0.1, name={name!r}); "
            "print(' '.join(w._actor_id.hex() for w in c.workers))")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    out = subprocess.run([sys.executable, "-c", code, str(indexes["all"])], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ids
    for client in (first, other):
        client.shutdown()


def test_rag_training_through_ray_matches_in_process(tmp_path: Path, tiny_encoder_path: Path, tiny_lm_path: Path, local_ray: None) -> None:
    import json

    from typer.testing import CliRunner

    from ragkit.cli import app
    from conftest import make_passages, write_jsonl

    runner = CliRunner()
    corpus = write_jsonl(tmp_path / "c.jsonl", make_passages(30))
    assert runner.invoke(app, ["index", "build", str(corpus), "-o", str(tmp_path / "idx"), "--model",
                               str(tiny_encoder_path), "--device", "cpu"]).exit_code == 0
    data = write_jsonl(tmp_path / "t.jsonl", [{"question": f"river king {i}", "answers": ["city"]} for i in range(4)])
    losses = {}
    for mode in ("none", "ray"):
        out = tmp_path / mode
        result = runner.invoke(app, ["train", "--arch", "rag", "--data", str(data), "--index", str(tmp_path / "idx"),
                                     "--generator", str(tiny_lm_path), "-o", str(out), "--n-docs", "3", "--max-steps", "3",
                                     "--batch-size", "2", "--logging-steps", "1", "--device", "cpu",
                                     "--distributed-retriever", mode, "--num-retrieval-workers", "2"])
        assert result.exit_code == 0, result.stderr
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [r["loss"] for r in rows if "loss" in r]
    assert losses["ray"] == pytest.approx(losses["none"], rel=1e-5)
