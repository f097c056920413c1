"""The real vLLM engine (vllm-cpu here, `make test-vllm` in .venv-vllm; vllm on a GPU): its answers against the
transformers backend's on the same prompts, Self-RAG's critique scores against the transformers decoder, the
CLI end to end on the shipped SmolLM2 and on a Self-RAG checkpoint exported by `ragkit export`, and the errors.

One engine per model per session (loading costs ~30 s on 2 cores); float32 on both sides, so that differences
are the kernels' and not the dtype's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="vLLM is not installed here (make vllm-env, then make test-vllm)")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache on the CPU (the default is 4)
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.__stderr__")  # pytest swaps sys.stderr out and closes it

from conftest import build_tiny_selfrag_lm, write_jsonl  # noqa: E402

POPQA = Path(__file__).resolve().parent / "data" / "popqa_longtail_w_gs.first16.jsonl"  # tests/data/README.md
RAGKIT = [sys.executable, "-m", "ragkit.cli"]


@pytest.fixture(scope="session")
def smollm_engines():
    from ragkit.models.generator import Generator, VLLMGenerator

    engines = VLLMGenerator("smollm2-135m", dtype="float32"), Generator("smollm2-135m", dtype="float32", device="cpu")
    yield engines
    _shut_down(engines[0].llm)


def _shut_down(llm) -> None:
    """End vLLM's engine process while pytest's streams are open (else it logs to a closed file at exit)."""
    import gc

    shutdown = getattr(getattr(llm, "llm_engine", None), "shutdown", None)
    if callable(shutdown):
        shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="session")
def selfrag_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Reflection tokens on a tiny Llama 128 wide (vLLM's CPU attention needs head sizes of 32 and up)."""
    return build_tiny_selfrag_lm(tmp_path_factory.mktemp("selfrag-vllm"), hidden=128)


def popqa_questions(n: int):
    from ragkit.errors import Location
    from ragkit.io.queries import question_from_json

    rows = [json.loads(line) for line in POPQA.read_text().splitlines()[:n]]
    return [question_from_json(r, Location(str(POPQA), i)) for i, r in enumerate(rows, start=1)]


@pytest.mark.parametrize("arch", ["none", "rag"])
def test_greedy_answers_equal_the_transformers_backend(smollm_engines, arch: str) -> None:
    from ragkit.archs.reader.inference import ClosedBookOptions, ReaderAnswerer, RetrieveReadOptions

    vllm_gen, hf_gen = smollm_engines
    options = (RetrieveReadOptions(k=2, passages="ctxs", max_new_tokens=16) if arch == "rag"
               else ClosedBookOptions(max_new_tokens=16))
    questions = popqa_questions(16)
    ours = ReaderAnswerer(vllm_gen, options).answer(questions)
    theirs = ReaderAnswerer(hf_gen, options).answer(questions)
    differ = [(a["question"], a["output"], b["output"]) for a, b in zip(ours, theirs) if a["output"] != b["output"]]
    # float32 kernels differ in summation order; a near-tie can flip a greedy token, nothing more
    assert len(differ) <= 1, differ
    assert all(a["passages"] == b["passages"] for a, b in zip(ours, theirs))


@pytest.fixture(scope="session")
def selfrag_engines(selfrag_model: Path):
    """(the vLLM engine and its log-probability width, the transformers model and tokenizer), loaded once."""
    from ragkit.archs.selfrag.decoding import VLLMSelfRagDecoder
    from ragkit.archs.selfrag.inference import SelfRagOptions
    from ragkit.archs.selfrag.loading import load_causal_lm, load_selfrag_decoder

    decoder = load_selfrag_decoder(str(selfrag_model), SelfRagOptions().decoding(), dtype="float32", backend="vllm")
    assert isinstance(decoder, VLLMSelfRagDecoder) and decoder.device == "cpu"
    yield (decoder.llm, decoder.logprobs), load_causal_lm(str(selfrag_model), device="cpu", dtype="float32")
    _shut_down(decoder.llm)


@pytest.mark.parametrize(("mode", "long_form"), [("always_retrieve", False), ("adaptive_retrieval", False),
                                                 ("no_retrieval", False), ("always_retrieve", True),
                                                 ("adaptive_retrieval", True)])
def test_self_rag_scores_agree_with_the_transformers_decoder(selfrag_engines, mode: str, long_form: bool) -> None:
    """Relevance / support / utility probabilities (short form: per candidate; long form: per segment) within
    1e-3, and the same answers, retrieval decisions and retrieval probabilities."""
    from ragkit.archs.selfrag.decoding import SelfRagDecoder, VLLMSelfRagDecoder
    from ragkit.archs.selfrag.inference import SelfRagAnswerer, SelfRagOptions
    from ragkit.io.queries import Question

    (llm, logprobs), (model, tokenizer) = selfrag_engines
    options = SelfRagOptions(mode=mode, long_form=long_form, k=2, max_new_tokens=8, max_depth=3, threshold=0.0)
    ctxs = [{"title": "paris", "text": "the king of france was born in paris"},
            {"title": "rome", "text": "music film poet of the city"}]
    questions = [Question("a", "who was the king of france", ctxs), Question("b", "the river in london", ctxs)]
    decoders = {"vllm": VLLMSelfRagDecoder(llm, options.decoding(), logprobs=logprobs, device="cpu"),
                "transformers": SelfRagDecoder(model, tokenizer, options.decoding())}
    rows = {name: SelfRagAnswerer(d, options, None).answer(questions) for name, d in decoders.items()}
    compared = 0
    for ours, theirs in zip(rows["vllm"], rows["transformers"]):
        assert ours["output"] == theirs["output"] and ours["retrieved"] == theirs["retrieved"]
        if theirs.get("retrieve_prob") is not None:
            assert ours["retrieve_prob"] == pytest.approx(theirs["retrieve_prob"], abs=1e-3)
        assert len(ours.get("candidates", [])) == len(theirs.get("candidates", []))
        for a, b in zip(ours.get("candidates", []), theirs.get("candidates", [])):
            assert a.keys() == b.keys()
            for score in ("relevance", "support", "utility", "final"):
                if "scores" in b:
                    assert a["scores"][score] == pytest.approx(b["scores"][score], abs=1e-3), (score, a, b)
                    compared += 1
        assert [s["text"] for s in ours.get("segments", [])] == [s["text"] for s in theirs.get("segments", [])]
        for a, b in zip(ours.get("segments", []), theirs.get("segments", [])):
            assert a["score"] == pytest.approx(b["score"], abs=1e-3)
            compared += 1
    assert compared > 0 or mode == "no_retrieval"  # something was scored on both sides


def test_compat_plain_text_is_vllms_own_default_decode(selfrag_engines) -> None:
    """--compat-upstream reads continuations as the reference does: vLLM's text with skip_special_tokens=True.
    ragkit rebuilds it from token ids (ragkit/archs/selfrag/upstream.py); here vLLM itself decodes the same
    prompts both ways, and both backends' compat answers agree."""
    from vllm import SamplingParams

    from ragkit.archs.selfrag import upstream as reference
    from ragkit.archs.selfrag.decoding import SelfRagDecoder, VLLMSelfRagDecoder
    from ragkit.archs.selfrag.inference import SelfRagAnswerer, SelfRagOptions
    from ragkit.io.queries import Question

    (llm, logprobs), (model, tokenizer) = selfrag_engines
    prompts = ["### Instruction:\nwho was the king of france\n\n### Response:\n[Retrieval]<paragraph>paris\nthe king"
               "</paragraph>", "### Instruction:\nthe river in london\n\n### Response:\n[No Retrieval]"]
    params = SamplingParams(temperature=0.0, max_tokens=12, skip_special_tokens=True)
    for out in llm.generate(prompts, params, use_tqdm=False):
        completion = out.outputs[0]
        assert reference.vllm_plain_text(tokenizer, out.prompt_token_ids, completion.token_ids) == completion.text
    options = SelfRagOptions(mode="always_retrieve", k=2, max_new_tokens=8, compat_upstream=True, task="popqa")
    ctxs = [{"title": "paris", "text": "the king of france was born in paris"},
            {"title": "rome", "text": "music film poet of the city"}]
    questions = [Question("a", "who was the king of france", ctxs), Question("b", "the river in london", ctxs)]
    decoders = [VLLMSelfRagDecoder(llm, options.decoding(), logprobs=logprobs, device="cpu"),
                SelfRagDecoder(model, tokenizer, options.decoding())]
    ours, theirs = (SelfRagAnswerer(d, options, None).answer(questions) for d in decoders)
    assert [r["output"] for r in ours] == [r["output"] for r in theirs]


def test_cli_end_to_end_on_smollm_and_on_an_exported_self_rag_checkpoint(selfrag_model: Path, tmp_path: Path) -> None:
    """`ragkit generate --backend vllm` as a user runs it (vLLM's engine in its own process), closed book on the
    shipped SmolLM2 and Self-RAG on a checkpoint trained with LoRA and merged by `ragkit export`."""
    rows = [{"instruction": "who was the king of france",
             "output": "[Retrieval]<paragraph>paris\nthe king</paragraph>[Relevant]the king[Fully supported][Utility:5]"}] * 4
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    run = tmp_path / "run"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
    for args in (["train", "--arch", "selfrag", "--data", data, "--generator", selfrag_model, "-o", run, "--max-steps", 2,
                  "--batch-size", 2, "--lora-r", 4, "--device", "cpu"],
                 ["export", run / "final", "-o", tmp_path / "merged"]):
        done = subprocess.run([*RAGKIT, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    q = write_jsonl(tmp_path / "q.jsonl", [{"id": "x", "question": "who was the king of france",
                                             "ctxs": [{"title": "paris", "text": "the king was born in paris"}]}])
    selfrag = subprocess.run([*RAGKIT, "generate", str(q), "--arch", "selfrag", "-m", str(tmp_path / "merged"),
                              "--backend", "vllm", "--dtype", "float32", "--mode", "always_retrieve", "--k", "1",
                              "--max-new-tokens", "6"], capture_output=True, text=True, env=env, timeout=600)
    assert selfrag.returncode == 0, selfrag.stderr[-2000:]
    [row] = [json.loads(line) for line in selfrag.stdout.splitlines()]
    assert row["id"] == "x" and row["retrieved"] is True and row["passages"][0]["title"] == "paris"
    closed = subprocess.run([*RAGKIT, "eval", "--task", "popqa", "--data", str(POPQA), "--limit", "4", "-m",
                             "smollm2-135m", "--backend", "vllm", "--json"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert closed.returncode == 0, closed.stderr[-2000:]
    assert json.loads(closed.stdout)["metrics"]["match"]["n"] == 4


def test_a_model_vllm_cannot_load_is_exit_4_in_one_line(tmp_path: Path, tiny_encoder_path: Path) -> None:
    done = subprocess.run([*RAGKIT, "generate", "-", "-m", str(tiny_encoder_path.parent / "bert"), "--backend", "vllm"],
                          input="q\n", capture_output=True, text=True, timeout=600)
    assert done.returncode == 4, done.stderr[-2000:]
    assert "Error: vLLM could not load" in done.stderr
