"""Shared fixtures: a tiny random sentence-transformers encoder built from a config, corpora, vectors."""

from __future__ import annotations

import inspect
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

WORDS = (
    "the a of and to in is was for on with as by at from his her it he she that which who city river "
    "king queen war music film poet actor politician football player born died river mountain science "
    "physics chemistry biology paris london rome berlin france england italy germany team club song book"
).split()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


INIT_RANGE = 0.5  # large random weights keep different texts apart (0.02 collapses them to cos≈0.98)


def build_tiny_encoder(directory: Path, *, hidden: int = 32, seed: int = 0) -> Path:
    """A 2-layer BERT with a small word vocabulary, wrapped as a sentence-transformers model."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(seed)
    raw = directory / "bert"
    raw.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz0123456789"]
    (raw / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    # transformers 5 names the argument `vocab`, transformers 4 `vocab_file`
    vocab_arg = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab_file"
    tokenizer = BertTokenizerFast(**{vocab_arg: str(raw / "vocab.txt")}, do_lower_case=True)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=128, initializer_range=INIT_RANGE,
    )
    BertModel(config).save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    word = models.Transformer(str(raw), max_seq_length=64)
    pooling = models.Pooling(word.get_embedding_dimension(), pooling_mode="mean")
    out = directory / "st"
    SentenceTransformer(modules=[word, pooling, models.Normalize()], device="cpu").save(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_encoder_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture(scope="session")
def other_tiny_encoder_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture and dimension, different weights: must be refused by an index of the first."""
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder-2"), seed=1)


@pytest.fixture(scope="session")
def wide_tiny_encoder_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder-48"), hidden=48)


def make_passages(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"id": f"doc-{i}", "title": f"{rng.choice(WORDS)} {i}", "text": " ".join(rng.choices(WORDS, k=12)), "lang": "en"}
        for i in range(n)
    ]


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", make_passages(40))


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build_tiny_causal_lm(directory: Path, *, seed: int = 0, hidden: int = 32) -> Path:
    """A 2-layer Llama over a word-level vocabulary, with pad/eos tokens and no chat template.
    (bitsandbytes' CPU kernels need layers at least 64 wide: hidden=64.)"""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<s>", "</s>", *dict.fromkeys(WORDS), *"0123456789?.:[]"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=True)
    out = directory / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_lm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="session")
def tiny_lm64_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama 64 wide, as bitsandbytes' 4-/8-bit CPU kernels need."""
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm-64"), hidden=64)


def build_tiny_selfrag_lm(directory: Path, *, seed: int = 0, hidden: int = 32) -> Path:
    """The tiny Llama with the Self-RAG reflection vocabulary added (random, untrained rows)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragkit.archs.selfrag.tokens import add_reflection_tokens

    base = build_tiny_causal_lm(directory / "base", seed=seed, hidden=hidden)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    add_reflection_tokens(tokenizer, model)
    out = directory / "tiny-selfrag"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_selfrag_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_selfrag_lm(tmp_path_factory.mktemp("tiny-selfrag"))


def run_cli(*args: object, input_: str | None = None):
    """Invoke the ragkit CLI in-process; stdout and stderr stay apart (result.stdout / result.stderr)."""
    from typer.testing import CliRunner

    from ragkit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], input=input_)


def run_torchrun(args: list[object], *, processes: int = 2, timeout: int = 300, script: Path | None = None):
    """`ragkit ARGS` (or `python SCRIPT ARGS`) as `processes` torchrun ranks on the CPU (gloo), on a free
    local port."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    program = script or Path(sys.executable).parent / "ragkit"
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                           "--master_addr", "127.0.0.1", "--master_port", str(port), str(program), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
