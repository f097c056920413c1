"""Issue 14.7, the architecture contract (peft's MODELS x CONFIGS habit): every registered architecture is
built tiny from configs, trained 4 steps with a checkpoint at 2, resumed from that checkpoint to the same
losses, reloaded with plain transformers / peft / sentence-transformers, and answers through the inference
protocol (ragkit.load, the function `ragkit generate` calls)."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from conftest import WORDS, make_passages, write_jsonl
from ragkit.archs import registry
from ragkit.cli import app

runner = CliRunner()
COMMON = ["--max-steps", "4", "--save-steps", "2", "--logging-steps", "1", "--batch-size", "2", "--lr", "1e-2",
          "--device", "cpu", "--seed", "3"]


def cli(*args: object) -> Any:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    return result


def index_over(root: Path, encoder: Path) -> Path:
    corpus = write_jsonl(root / "corpus.jsonl", make_passages(20))
    cli("index", "build", corpus, "-o", root / "idx", "--model", encoder, "--device", "cpu")
    return root / "idx"


def rag_case(root: Path, lm: Path, encoder: Path) -> list[object]:
    data = write_jsonl(root / "train.jsonl", [{"question": f"river king {i}", "answers": ["city music"]} for i in range(8)])
    return ["--data", data, "--index", index_over(root, encoder), "--generator", lm, "--n-docs", 2]


def selfrag_case(root: Path, lm: Path, encoder: Path) -> list[object]:
    rows = [{"instruction": "who was the king of france",
             "output": "[Retrieval]<paragraph>paris\nthe king was born in paris</paragraph>[Relevant]the king"
                       "[Fully supported][Utility:5]"},
            {"instruction": "the river in london", "output": "[No Retrieval]the river[Utility:4]"}] * 4
    return ["--data", write_jsonl(root / "gen.jsonl", rows), "--generator", lm, "--lora-r", 4]


def critic_case(root: Path, lm: Path, encoder: Path) -> list[object]:
    rows = [{"instruction": "is the evidence relevant", "input": "paris", "output": "[Relevant]", "task": "relevance"},
            {"instruction": "should one retrieve", "input": "rome", "output": "[Retrieval]", "task": "retrieval"}] * 4
    return ["--data", write_jsonl(root / "critic.jsonl", rows), "--generator", lm, "--lora-r", 0]


def embedder_case(root: Path, lm: Path, encoder: Path) -> list[object]:
    pairs = [{"query": p["title"], "positive": p["text"]} for p in make_passages(12)]
    return ["--data", write_jsonl(root / "pairs.jsonl", pairs), "--embedder", encoder]


def retro_case(root: Path, lm: Path, encoder: Path) -> list[object]:
    texts = root / "texts"
    texts.mkdir()
    rng = random.Random(0)
    for d in range(6):
        own = rng.sample(WORDS, 5)
        (texts / f"doc{d}.txt").write_text(" ".join(rng.choice(own) for _ in range(40)))
    return ["--data", texts, "--workdir", root / "work", "--tokenizer", lm, "--embedder", encoder, "--chunk-size", 4,
            "--seq-len", 16, "--num-neighbors", 2, "--retro-dim", 32, "--retro-dec-depth", 2, "--retro-enc-depth", 1,
            "--retro-heads", 2, "--retro-dim-head", 16, "--retro-cross-attn-layers", 1]


def reload_rag(final: Path, lm: Path) -> None:
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(final / "generator").config.num_hidden_layers == 2
    assert SentenceTransformer(str(final / "query_encoder"), device="cpu").encode(["x"]).shape == (1, 32)


def reload_selfrag(final: Path, lm: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(final / "model")
    base = AutoModelForCausalLM.from_pretrained(lm)
    base.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(base, final / "model")
    assert "[Retrieval]" in tokenizer.get_vocab() and any("lora" in n for n, _ in model.named_parameters())


def reload_critic(final: Path, lm: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(final / "model")
    assert model.get_input_embeddings().weight.shape[0] == len(AutoTokenizer.from_pretrained(final / "model"))


def reload_embedder(final: Path, lm: Path) -> None:
    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(str(final / "embedder"), device="cpu").encode(["x"]).shape == (1, 32)


def reload_retro(final: Path, lm: Path) -> None:
    from transformers import AutoModel

    from ragkit.archs.retro.model import RetroModel

    assert isinstance(AutoModel.from_pretrained(final / "model"), RetroModel)  # importing it registers the type


def answer_rag(final: Path, root: Path) -> None:
    [row] = registry.load("rag", str(final), k=1, max_new_tokens=3, device="cpu").answer(["river king 1"])
    assert len(row["passages"]) == 1 and isinstance(row["output"], str)


def answer_selfrag(final: Path, root: Path) -> None:
    rows = registry.load("selfrag", str(final), mode="no_retrieval", max_new_tokens=3, device="cpu").answer(
        ["who was the king of france"])
    assert len(rows) == 1 and rows[0]["retrieved"] is False


def answer_critic(final: Path, root: Path) -> None:
    [row] = registry.load("selfrag-critic", str(final), critic_task="retrieval", device="cpu").answer(["rome"])
    assert row["output"] in row["probs"] and sum(row["probs"].values()) == pytest.approx(1.0)


def answer_embedder(final: Path, root: Path) -> None:
    """The embedder's inference is retrieval: an index built with it answers queries."""
    from ragkit import Retriever

    assert registry.get("embedder").inference is None
    corpus = write_jsonl(root / "small.jsonl", make_passages(6))
    cli("index", "build", corpus, "-o", root / "tuned-idx", "--model", final / "embedder", "--device", "cpu")
    [hits] = Retriever(root / "tuned-idx", device="cpu").retrieve(["river"], k=2)
    assert len(hits) == 2


def answer_retro(final: Path, root: Path) -> None:
    [row] = registry.load("retro", str(final), max_new_tokens=4, device="cpu").answer(["the king"])
    assert row["new_tokens"] >= 1 and row["prompt"] == "the king"


CONTRACT: dict[str, tuple[Callable[..., list[object]], Callable[[Path, Path], None], Callable[[Path, Path], None]]] = {
    "rag": (rag_case, reload_rag, answer_rag),
    "selfrag": (selfrag_case, reload_selfrag, answer_selfrag),
    "selfrag-critic": (critic_case, reload_critic, answer_critic),
    "embedder": (embedder_case, reload_embedder, answer_embedder),
    "retro": (retro_case, reload_retro, answer_retro),
}


def test_the_contract_covers_every_registered_architecture() -> None:
    assert set(CONTRACT) == set(registry.TRAINABLE)


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("arch", list(CONTRACT))
def test_architecture_contract(arch: str, tmp_path: Path, tiny_lm_path: Path, tiny_encoder_path: Path) -> None:
    case, reload, answer = CONTRACT[arch]
    args = ["train", "--arch", arch, *case(tmp_path, tiny_lm_path, tiny_encoder_path), *COMMON]
    full = tmp_path / "full"
    cli(*args, "-o", full)
    assert sorted(losses(full)) == [1, 2, 3, 4]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    cli(*args, "-o", resumed, "--resume")
    a, b = losses(full), losses(resumed)
    assert sorted(b) == [3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (arch, step, a, b)
    reload(full / "final", tiny_lm_path)
    answer(full / "final", tmp_path)
