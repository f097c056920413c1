"""`ragkit generate` and `ragkit eval` on a tiny Llama built from a config, through Typer and a real shell pipe."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragkit.cli import app

from conftest import write_jsonl
from test_cli import ragkit_executable

runner = CliRunner()

QUESTIONS = [
    {"id": "q1", "question": "who was the king", "answers": ["king"], "ctxs": [{"id": "c1", "title": "king", "text": "the king was born", "score": "1.5"}]},
    {"id": "q2", "question": "which city is in france", "answers": ["paris"], "ctxs": [{"title": "paris", "text": "paris is a city in france"}]},
    {"id": "q3", "question": "what is science", "answers": ["physics"], "ctxs": [{"title": "science", "text": "physics is a science"}]},
]


def run(*args: object, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "qa.jsonl", QUESTIONS)


def test_generate_closed_book_schema_and_order(tiny_lm_path: Path, data: Path) -> None:
    result = run("generate", data, "--model", tiny_lm_path, "--max-new-tokens", "4", "--device", "cpu", "--batch-size", "2")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in rows] == ["q1", "q2", "q3"]
    for row, src in zip(rows, QUESTIONS):
        assert set(row) >= {"id", "question", "output", "passages", "new_tokens", "timings", "answers"}
        assert row["passages"] == [] and row["answers"] == src["answers"] and "ctxs" not in row
        assert 0 < row["new_tokens"] <= 4 and isinstance(row["output"], str)


def test_generate_is_deterministic_and_batch_invariant(tiny_lm_path: Path, data: Path) -> None:
    outs = []
    for batch in ("1", "3"):
        result = run("generate", data, "--model", tiny_lm_path, "--max-new-tokens", "5", "--device", "cpu",
                     "--batch-size", batch, "--stop", "</never>")
        assert result.exit_code == 0, result.stderr
        outs.append([json.loads(line)["output"] for line in result.stdout.splitlines()])
    assert outs[0] == outs[1], "left padding must not change greedy outputs"


def test_rag_with_ctxs_and_with_an_index(tiny_lm_path: Path, tiny_encoder_path: Path, data: Path, tmp_path: Path) -> None:
    result = run("generate", data, "--model", tiny_lm_path, "--arch", "rag", "--k", "1", "--max-new-tokens", "2", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    first = json.loads(result.stdout.splitlines()[0])
    assert first["passages"] == [{"id": "c1", "title": "king", "text": "the king was born", "score": 1.5}]

    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": f"d{i}", "title": c["title"], "text": c["text"]}
                                                        for i, q in enumerate(QUESTIONS) for c in q["ctxs"]])
    build = run("index", "build", corpus, "-o", tmp_path / "idx", "--model", tiny_encoder_path, "--device", "cpu")
    assert build.exit_code == 0, build.stderr
    result = run("generate", data, "--model", tiny_lm_path, "--arch", "rag", "--index", tmp_path / "idx", "--k", "2",
                 "--max-new-tokens", "2", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(len(r["passages"]) == 2 and r["passages"][0]["id"].startswith("d") for r in rows)


def test_rag_without_passages_or_index_is_a_usage_error(tmp_path: Path, tiny_lm_path: Path) -> None:
    """Issue 27.9: the missing piece is the index (a flag), so exit 2, naming the first question without
    passages, its file and line (checked when the input is read, before the model loads)."""
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "a", "ctxs": [{"title": "t", "text": "x"}]}\n{"question": "b"}\n')
    result = run("generate", questions, "--model", tiny_lm_path, "--arch", "rag", "--device", "cpu")
    assert result.exit_code == 2, result.stderr
    assert "q.jsonl:2: question '2' has no passages ('ctxs' or 'hits') and no index was given" in result.stderr
    result = run("generate", "--model", tiny_lm_path, "--arch", "rag", "--device", "cpu", input="a plain question\n")
    assert result.exit_code == 2 and "has no passages" in result.stderr


def test_generate_errors(tmp_path: Path, tiny_lm_path: Path) -> None:
    result = run("generate", "--model", tmp_path / "missing-model")
    assert result.exit_code == 4 and "does not exist" in result.stderr
    result = run("generate", "--model", tiny_lm_path, input='{"id": 1}\n')
    assert result.exit_code == 3 and "<stdin>:1: field 'question' is missing" in result.stderr
    result = run("generate", "--model", tiny_lm_path, "--arch", "selfrag", input="q\n")
    assert result.exit_code == 4 and "no Self-RAG reflection tokens" in result.stderr
    result = run("generate", "--model", tiny_lm_path, "--arch", "retro", input="q\n")
    assert result.exit_code == 4 and "not a RETRO checkpoint" in result.stderr
    result = run("generate", "--model", tiny_lm_path, "--arch", "bogus", input="q\n")
    assert result.exit_code == 2


def test_eval_scores_piped_predictions_and_writes_report(data: Path, tmp_path: Path) -> None:
    preds = "\n".join(json.dumps({"id": q, "output": out}) for q, out in
                      [("q1", "The king"), ("q2", "Lyon"), ("q3", "physics")]) + "\n"
    report_path = tmp_path / "r.json"
    result = run("eval", "--task", "qa", "--data", data, "-o", report_path, "--json", input=preds)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["metrics"]["match"]["mean"] == pytest.approx(2 / 3)
    assert summary["metrics"]["em"]["mean"] == pytest.approx(2 / 3)  # "The king" normalises to "king"
    report = json.loads(report_path.read_text())
    assert set(report) >= {"ragkit_version", "git_revision", "task", "primary_metric", "n", "metrics", "config", "timings", "rows"}
    assert report["n"] == 3 and report["primary_metric"] == "match"
    assert set(report["metrics"]["match"]) == {"mean", "n", "ci95"}
    assert report["rows"][1] == {"id": "q2", "question": "which city is in france", "golds": ["paris"], "prediction": "Lyon",
                                 "metrics": {"match": 0.0, "match_norm": 0.0, "em": 0.0, "f1": 0.0}}


def test_eval_rejects_predictions_for_unknown_ids(data: Path) -> None:
    result = run("eval", "--task", "qa", "--data", data, input='{"id": "q1", "output": "x"}\n{"id": "zz", "output": "y"}\n')
    assert result.exit_code == 3
    assert result.stderr.startswith("Error: <stdin>:2: field 'id': id 'zz' is not in the data")


@pytest.mark.parametrize("argv, code, message", [
    (["eval", "--task", "mmlu", "--data", "x"], 2, "unknown task"),
    (["eval", "--data", "x"], 2, "--task is required"),
    (["eval", "--task", "qa", "--data", "/no/such/file.jsonl"], 4, "no such file"),
])
def test_eval_usage_errors(argv: list[str], code: int, message: str) -> None:
    result = run(*argv, input="")
    assert result.exit_code == code and message in result.stderr


def test_eval_compare_and_plot(data: Path, tmp_path: Path) -> None:
    for name, outs in (("closed", ["x", "y", "z"]), ("rag", ["king", "paris", "z"])):
        preds = "".join(json.dumps({"id": f"q{i + 1}", "output": o}) + "\n" for i, o in enumerate(outs))
        assert run("eval", "--task", "qa", "--data", data, "-o", tmp_path / f"{name}.json", input=preds).exit_code == 0
    result = run("eval", "compare", tmp_path / "closed.json", tmp_path / "rag.json", "--plot", tmp_path / "cmp.png", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["rag"]["match"] == pytest.approx(2 / 3)
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert run("eval", "compare", bad).exit_code == 3
    good = json.loads((tmp_path / "rag.json").read_text())
    # issue 27.9: a report whose fields have the wrong types failed as a TypeError (exit 1) inside the table
    for field, value in (("metrics", 5), ("metrics.match.mean", "x"), ("metrics.match.ci95", [0]), ("n", "3"),
                         ("primary_metric", "nope"), ("rows", {})):
        broken = json.loads(json.dumps(good))
        target, *path = field.split(".")
        if path:
            holder = broken[target]
            for key in path[:-1]:
                holder = holder[key]
            holder[path[-1]] = value
        else:
            broken[target] = value
        bad.write_text(json.dumps(broken))
        result = run("eval", "compare", bad, tmp_path / "rag.json")
        assert result.exit_code == 3 and f"field '{field}'" in result.stderr, (field, result.stderr)


def test_generate_then_eval_through_a_shell_pipe(tiny_lm_path: Path, data: Path, tmp_path: Path) -> None:
    exe = ragkit_executable()
    cmd = (f"{exe} generate {data} --model {tiny_lm_path} --max-new-tokens 3 --device cpu "
           f"| {exe} eval --task qa --data {data} --json -o {tmp_path / 'r.json'}")
    out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["n"] == 3 and summary["task"] == "qa" and 0.0 <= summary["metrics"]["f1"]["mean"] <= 1.0


def test_eval_beir_from_search_output(tmp_path: Path, tiny_encoder_path: Path) -> None:
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    write_jsonl(beir / "corpus.jsonl", [{"_id": f"d{i}", "title": "", "text": t} for i, t in
                                         enumerate(["river king", "city music", "poet born", "science physics"])])
    write_jsonl(beir / "queries.jsonl", [{"_id": "1", "text": "river king"}, {"_id": "2", "text": "science physics"}])
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\td0\t1\n2\td3\t1\n")
    assert run("index", "build", beir, "-o", tmp_path / "idx", "--model", tiny_encoder_path, "--device", "cpu").exit_code == 0
    hits = run("index", "search", tmp_path / "idx", "-q", beir / "queries.jsonl", "--k", "4")
    result = run("eval", "--task", "beir", "--data", beir, "--json", input=hits.stdout)
    assert result.exit_code == 0, result.stderr
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["ndcg@10"]["mean"] == pytest.approx(1.0) and metrics["mrr@10"]["mean"] == pytest.approx(1.0)


def test_vllm_backend_refuses_quantize_instead_of_ignoring_it(tiny_lm_path: Path) -> None:
    result = run("generate", "--model", tiny_lm_path, "--backend", "vllm", "--quantize", "int8", input="q\n")
    assert result.exit_code == 2 and "--quantize int8 is for --backend transformers" in result.stderr


def test_int8_quantised_generator_still_generates(tiny_lm_path: Path) -> None:
    import torch

    from ragkit.models.generator import GenerationConfig, Generator

    plain = Generator(str(tiny_lm_path), device="cpu")
    quantised = Generator(str(tiny_lm_path), device="cpu", quantize="int8")
    linear = [m for m in quantised.model.modules() if isinstance(m, torch.nn.Linear)]
    assert not linear  # every Linear replaced by its dynamic int8 version
    prompts = ["who was the king of france", "the river in london"]
    config = GenerationConfig(max_new_tokens=5)
    a, b = plain.generate(prompts, config), quantised.generate(prompts, config)
    assert all(g.new_tokens == 5 for g in b)
    # int8 weights move the logits a little; the first greedy token of a 2-layer random model mostly survives
    assert sum(x.text.split()[:1] == y.text.split()[:1] for x, y in zip(a, b)) >= 1
    # bitsandbytes' CPU 4-bit kernels need 64-wide layers: a clear error at load, not a reshape crash mid-forward
    pytest.importorskip("bitsandbytes")
    result = run("generate", "--model", tiny_lm_path, "--quantize", "4bit", "--device", "cpu", input="q\n")
    assert result.exit_code == 2 and "multiples of 64" in result.stderr


@pytest.mark.parametrize("bits,layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_bitsandbytes_generator_loads_and_generates_on_cpu(tiny_lm64_path: Path, bits: str, layer: str) -> None:
    pytest.importorskip("bitsandbytes")
    from ragkit.models.generator import GenerationConfig, Generator

    plain = Generator(str(tiny_lm64_path), device="cpu")
    quantised = Generator(str(tiny_lm64_path), device="cpu", quantize=bits)
    kinds = {type(m).__name__ for m in quantised.model.model.layers.modules()}
    assert layer in kinds and "Linear" not in kinds  # every projection of the decoder layers quantised
    layer_bytes = {name: sum(p.numel() * p.element_size() for p in g.model.model.layers.parameters())
                   for name, g in (("plain", plain), ("quantised", quantised))}
    assert layer_bytes["quantised"] < layer_bytes["plain"] * (0.2 if bits == "4bit" else 0.3)
    prompts = ["who was the king of france", "the river in london"]
    out = quantised.generate(prompts, GenerationConfig(max_new_tokens=5))
    assert [g.new_tokens for g in out] == [5, 5]
    result = run("generate", "--model", tiny_lm64_path, "--quantize", bits, "--device", "cpu", "--max-new-tokens", 3,
                 input="who was the king\n")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["output"] != ""


def test_vllm_backend_maps_options_and_keeps_each_answer_with_its_question(tiny_lm_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """ragkit's side of --backend vllm (no GPU here): a stand-in `vllm` module records what ragkit asks
    for and answers each prompt with its own last words, so a reordering would show."""
    import sys
    import types

    from transformers import AutoTokenizer

    seen: dict = {}

    class SamplingParams:
        def __init__(self, **kwargs) -> None:
            seen.setdefault("params", []).append(kwargs)

    class LLM:
        def __init__(self, model: str, dtype: str, trust_remote_code: bool, tensor_parallel_size: int,
                     **extra: object) -> None:
            seen["llm"] = (model, dtype, trust_remote_code, tensor_parallel_size, extra)

        def get_tokenizer(self):
            return AutoTokenizer.from_pretrained(tiny_lm_path)

        def generate(self, prompts, params, use_tqdm=True):
            seen.setdefault("prompts", []).append(list(prompts))
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=" " + p.split()[-1] + " ", token_ids=[1, 2])])
                    for p in prompts]

    platforms = types.SimpleNamespace(current_platform=types.SimpleNamespace(device_type="cpu"))
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams,
                                                                  platforms=platforms))
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    questions = ["who was the king", "where is the river", "what is music"]
    result = run("generate", "--backend", "vllm", "--model", tiny_lm_path, "--max-new-tokens", 3, "--template", "{prompt}",
                 input="\n".join(questions) + "\n")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["output"] for r in rows] == ["king", "river", "music"] and [r["new_tokens"] for r in rows] == [2, 2, 2]
    assert seen["llm"] == (str(tiny_lm_path), "auto", False, 1, {"runner": "generate", "enforce_eager": True})
    assert seen["params"][-1] == {"max_tokens": 3, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "stop": ["\n"], "seed": 0}
    result = run("generate", "--backend", "vllm", "--model", tiny_lm_path, "--do-sample", "--temperature", 0.7,
                 "--top-p", 0.9, "--top-k", 5, "--seed", 3, "--stop", "END", input="q\n")
    assert result.exit_code == 0, result.stderr
    assert seen["params"][-1] == {"max_tokens": 32, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "stop": ["END"], "seed": 3}
    result = run("generate", "--backend", "vllm", "--model", tiny_lm_path, "--tensor-parallel-size", 2, input="q\n")
    assert result.exit_code == 0 and seen["llm"][3] == 2, result.stderr


def test_options_vllm_cannot_honour_are_refused_and_a_missing_vllm_is_exit_4(tiny_lm_path: Path) -> None:
    result = run("generate", "--model", tiny_lm_path, "--tensor-parallel-size", 2, input="q\n")
    assert result.exit_code == 2 and "--tensor-parallel-size splits a model over GPUs with vLLM" in result.stderr
    result = run("generate", "--model", tiny_lm_path, "--backend", "vllm", "--device", "cuda", input="q\n")
    assert result.exit_code == 2 and "--device cuda: vLLM runs where its build targets" in result.stderr
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        result = run("generate", "--model", tiny_lm_path, "--backend", "vllm", input="q\n")
        assert result.exit_code == 4 and "vLLM is not installed" in result.stderr and "make vllm-env" in result.stderr
