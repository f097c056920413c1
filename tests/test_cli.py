"""The CLI through Typer's runner and through a real shell pipeline: JSONL on stdout, exit codes, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragkit.cli import app

from conftest import make_passages, write_jsonl

runner = CliRunner()


def run(*args: str, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


@pytest.fixture
def built_index(tmp_path: Path, corpus_file: Path, tiny_encoder_path: Path) -> Path:
    out = tmp_path / "idx"
    result = run("index", "build", corpus_file, "-o", out, "--model", tiny_encoder_path, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["passages"] == 40 and summary["spec"] == "flat" and summary["dim"] == 32
    return out


def test_help_lists_every_command_and_version() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for name in ("embed", "index", "train", "train-rag", "train-selfrag", "train-retro", "generate", "eval"):
        assert name in result.stdout
    assert run("--version").stdout.strip() == "ragkit 0.1.0"


def test_train_selfrag_alias_forwards_to_train() -> None:
    result = run("train-selfrag", "--lora-r", "8")
    assert result.exit_code == 2 and "--data is required" in result.stderr


@pytest.mark.parametrize("argv", [["train", "--arch", "retro"], ["train-retro"]])
def test_retro_without_a_work_folder_is_a_usage_error(argv: list[str]) -> None:
    result = run(*argv, "--data", "texts", "-o", "run")
    assert result.exit_code == 2
    assert "--workdir" in result.stderr and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) <= 2


def test_cli_import_is_light() -> None:
    code = "import sys, ragkit.cli; print(any(m in sys.modules for m in ('torch', 'faiss', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_search_writes_jsonl_with_passthrough(built_index: Path, corpus_file: Path) -> None:
    rows = [json.loads(line) for line in corpus_file.read_text().splitlines()]
    queries = json.dumps({"id": "q1", "question": rows[3]["title"] + " " + rows[3]["text"], "answers": ["x"]}) + "\nplain text query\n"
    result = run("index", "search", built_index, "--k", "5", input=queries)
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert first["id"] == "q1" and first["answers"] == ["x"] and first["question"] == first["query"]
    assert first["hits"][0]["id"] == "doc-3"  # the query is the passage's own text
    assert [h["rank"] for h in first["hits"]] == [1, 2, 3, 4, 5]
    assert set(first["hits"][0]) >= {"id", "score", "rank", "title", "text"}
    assert first["hits"][0]["metadata"] == {"lang": "en"}
    assert lines[1]["id"] == "2" and lines[1]["query"] == "plain text query"


def test_add_remove_info(built_index: Path, tmp_path: Path) -> None:
    extra = write_jsonl(tmp_path / "more.jsonl", [{"id": "doc-1", "text": "river king"}, {"id": "new", "text": "city song"}])
    result = run("index", "add", built_index, extra, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {"added": 1, "replaced": 1, "passages": 41, "compacted": False}
    result = run("index", "remove", built_index, "--ids", "doc-2,nope", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["removed"] == 1 and "nope" in result.stderr
    info = json.loads(run("index", "info", built_index, "--json", "--verify").stdout)
    assert info["passages"] == 40 and info["verified"] and info["version"] == 3
    search = run("index", "search", built_index, "--k", "1", input='{"query": "river king"}\n')
    assert json.loads(search.stdout)["hits"][0]["id"] == "doc-1"


def test_bad_corpus_line_exit_3_and_index_untouched(built_index: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "z1", "text": "ok"}\n{"id": "z2", "title": "no text"}\n')
    before = json.loads(run("index", "info", built_index, "--json").stdout)
    result = run("index", "add", built_index, bad, "--device", "cpu")
    assert result.exit_code == 3
    assert result.stderr.strip().splitlines()[0] == f"Error: {bad}:2: field 'text' is missing"
    assert json.loads(run("index", "info", built_index, "--json").stdout) == before


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["index", "build", "{corpus}", "-o", "{tmp}/x", "--spec", "bogus"], 2, "unknown index spec 'bogus'"),
        (["index", "build", "{corpus}", "-o", "{tmp}/x", "--model", "{tmp}/no-such-model/dir"], 4, "model folder"),
        (["index", "search", "{tmp}/not-an-index"], 4, "not a ragkit index"),
        (["index", "build", "{tmp}/missing.jsonl", "-o", "{tmp}/x"], 4, "no such file"),
        (["index", "remove", "{tmp}/x"], 2, "give --ids"),
        (["index", "build", "-o", "{tmp}/x"], 2, "exactly one"),
    ],
)
def test_error_exit_codes(tmp_path: Path, corpus_file: Path, argv: list[str], code: int, message: str) -> None:
    args = [a.format(corpus=corpus_file, tmp=tmp_path) for a in argv]
    result = run(*args)
    assert result.exit_code == code, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_offline_missing_hub_model_is_one_clear_error(tmp_path: Path, corpus_file: Path) -> None:
    result = run("index", "build", corpus_file, "-o", tmp_path / "x", "--model", "no-such-org/no-such-model")
    assert result.exit_code == 4
    assert "cannot load model 'no-such-org/no-such-model'" in result.stderr and "Hint:" in result.stderr


def test_search_refuses_another_embedder(built_index: Path, other_tiny_encoder_path: Path, wide_tiny_encoder_path: Path) -> None:
    result = run("index", "search", built_index, "--model", other_tiny_encoder_path, input="river\n")
    assert result.exit_code == 4 and "is not the model that built" in result.stderr
    result = run("index", "search", built_index, "--model", wide_tiny_encoder_path, input="river\n")
    assert result.exit_code == 4 and "dimension 48" in result.stderr


def test_malformed_query_line_exit_3(built_index: Path) -> None:
    result = run("index", "search", built_index, input='{"query": "ok"}\n{"query": \n')
    assert result.exit_code == 3 and "<stdin>:2: malformed JSON" in result.stderr


def test_embed_shards_then_build_matches_direct_build(tmp_path: Path, tiny_encoder_path: Path, built_index: Path, corpus_file: Path) -> None:
    import numpy as np

    emb = tmp_path / "emb"
    for shard in range(3):
        result = run("embed", corpus_file, "-o", emb, "--model", tiny_encoder_path, "--shard-id", shard,
                     "--num-shards", 3, "--dtype", "float32", "--device", "cpu")
        assert result.exit_code == 0, result.stderr
    metas = [json.loads((emb / f"shard-{i:05d}-of-00003.json").read_text()) for i in range(3)]
    assert [m["range"] for m in metas] == [[0, 13], [13, 26], [26, 40]]  # Self-RAG split: last takes the rest
    assert np.load(emb / "embeddings-00002-of-00003.npy").shape == (14, 32)
    result = run("index", "build", "--embeddings", emb, "-o", tmp_path / "from-emb", "--json")
    assert result.exit_code == 0, result.stderr
    query = '{"query": "river king city"}\n'
    a = json.loads(run("index", "search", built_index, "--k", "5", input=query).stdout)["hits"]
    b = json.loads(run("index", "search", tmp_path / "from-emb", "--k", "5", input=query).stdout)["hits"]
    assert [h["id"] for h in a] == [h["id"] for h in b]
    assert [h["score"] for h in a] == pytest.approx([h["score"] for h in b], abs=1e-5)
    (emb / "shard-00001-of-00003.json").unlink()
    result = run("index", "build", "--embeddings", emb, "-o", tmp_path / "partial")
    assert result.exit_code == 4 and "shards [1] of 3 are missing" in result.stderr


def test_auto_spec_under_budget_via_cli(tmp_path: Path, tiny_encoder_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", make_passages(600))
    result = run("index", "build", corpus, "-o", tmp_path / "a", "--model", tiny_encoder_path, "--spec", "auto",
                 "--max-memory", "60K", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["spec"].startswith("ivf-pq") and "needs" in summary["auto"]


def ragkit_executable() -> str:
    exe = Path(sys.executable).parent / "ragkit"
    return str(exe) if exe.exists() else shutil.which("ragkit") or "ragkit"


def test_real_shell_pipeline(built_index: Path, tmp_path: Path) -> None:
    queries = write_jsonl(tmp_path / "queries.jsonl", [{"id": f"q{i}", "query": w} for i, w in enumerate(["river", "king", "music"])])
    cmd = f"cat {queries} | {ragkit_executable()} index search {built_index} --k 5 | head -n 2"
    out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["id"] for r in lines] == ["q0", "q1"] and all(len(r["hits"]) == 5 for r in lines)
    assert "Error" not in out.stderr


def test_pooling_is_part_of_the_embedders_identity(tmp_path: Path, corpus_file: Path, tiny_encoder_path: Path) -> None:
    """--pooling cls is recorded in the manifest and the fingerprint; the index's queries are pooled the same
    way without being told; a query encoder pooling otherwise is refused (it was silently accepted)."""
    import numpy as np

    from ragkit.errors import ResourceError
    from ragkit.index import Index
    from ragkit.models.encoder import Encoder

    cls_idx, mean_idx = tmp_path / "cls", tmp_path / "mean"
    assert run("index", "build", corpus_file, "-o", cls_idx, "--model", tiny_encoder_path, "--device", "cpu",
               "--pooling", "cls").exit_code == 0
    assert run("index", "build", corpus_file, "-o", mean_idx, "--model", tiny_encoder_path, "--device", "cpu").exit_code == 0
    cls_info, mean_info = Index.open(cls_idx).encoder, Index.open(mean_idx).encoder
    assert (cls_info.pooling, mean_info.pooling) == ("cls", "mean")
    assert cls_info.fingerprint != mean_info.fingerprint
    # the CLS index answers with CLS-pooled queries (the top hit of a passage's own text is that passage)
    cls_encoder = Encoder(str(tiny_encoder_path), device="cpu", pooling="cls")
    mean_encoder = Encoder(str(tiny_encoder_path), device="cpu")
    text = "alpha beta gamma"
    assert not np.allclose(cls_encoder.encode_queries([text]), mean_encoder.encode_queries([text]))
    result = run("index", "search", cls_idx, "--k", 3, "--device", "cpu", input=text + "\n")
    assert result.exit_code == 0, result.stderr
    expected = Index.open(cls_idx).search(cls_encoder.encode_queries([text]), 3)[0]
    assert [h["id"] for h in json.loads(result.stdout)["hits"]] == [h.id for h in expected]
    with pytest.raises(ResourceError, match="pools by cls"):
        Index.open(mean_idx).check_encoder(cls_encoder.info)
    with pytest.raises(ResourceError, match="pools by mean"):
        Index.open(cls_idx).check_encoder(mean_encoder.info)
    assert run("index", "build", corpus_file, "-o", tmp_path / "x", "--model", tiny_encoder_path,
               "--pooling", "attention").exit_code == 2
