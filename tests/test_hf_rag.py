"""transformers' RAG and DPR checkpoints in ragkit, on tiny random models built from configs: a DPR
context/question pair as the embedder of an index, a RagTokenForGeneration / RagSequenceForGeneration folder
decoded and scored with ragkit's index exactly as transformers does given the same context_input_ids and
doc_scores, fine-tuned, and exported back to a folder transformers opens."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ragkit.cli import app

from conftest import WORDS, write_jsonl

runner = CliRunner()
K = 3


def run(*args: object, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def _tokenizer(root: Path, **special: str):
    from transformers import BertTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (root / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    vocab_arg = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab_file"
    return BertTokenizerFast(**{vocab_arg: str(root / "vocab.txt")}, do_lower_case=True, **special)


def _dpr_config(tok, projection: int = 0):
    from transformers import DPRConfig

    return DPRConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=128, projection_dim=projection, initializer_range=0.5)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from transformers import (BartConfig, BartForConditionalGeneration, DPRContextEncoder, DPRQuestionEncoder,
                              RagConfig, RagSequenceForGeneration, RagTokenForGeneration)

    root = tmp_path_factory.mktemp("hfrag")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAGKIT_HOME", str(root / "cache"))  # conversions are cached here, not in the user's cache
        q_tok = _tokenizer(root / "qtok")
        g_tok = _tokenizer(root / "gtok", bos_token="[CLS]", eos_token="[SEP]")
        torch.manual_seed(0)
        question, context = DPRQuestionEncoder(_dpr_config(q_tok)), DPRContextEncoder(_dpr_config(q_tok))
        for model, name in ((question, "dpr-q"), (context, "dpr-ctx")):
            model.save_pretrained(root / name)
            q_tok.save_pretrained(root / name)
        g_config = BartConfig(vocab_size=len(g_tok), d_model=16, encoder_layers=1, decoder_layers=1,
                              encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                              max_position_embeddings=128, pad_token_id=g_tok.pad_token_id,
                              bos_token_id=g_tok.bos_token_id, eos_token_id=g_tok.eos_token_id,
                              decoder_start_token_id=g_tok.eos_token_id, forced_bos_token_id=g_tok.bos_token_id,
                              forced_eos_token_id=None, init_std=0.3)
        generator = BartForConditionalGeneration(g_config)
        rags = {}
        for cls in (RagTokenForGeneration, RagSequenceForGeneration):
            config = RagConfig.from_question_encoder_generator_configs(question.config, generator.config, n_docs=K,
                                                                       max_combined_length=64)
            config.architectures = [cls.__name__]
            rag = cls(config=config, question_encoder=question, generator=generator).eval()
            folder = root / cls.__name__
            rag.save_pretrained(folder)
            q_tok.save_pretrained(folder / "question_encoder_tokenizer")
            g_tok.save_pretrained(folder / "generator_tokenizer")
            rags[cls.__name__] = folder
        import random

        rng = random.Random(0)
        passages = [{"id": f"p{i}", "title": f'"{rng.choice(WORDS)} {rng.choice(WORDS)}"' if i % 3 == 0 else rng.choice(WORDS),
                     "text": " ".join(rng.choices(WORDS, k=10))} for i in range(24)]
        corpus = write_jsonl(root / "corpus.jsonl", passages)
        result = run("index", "build", corpus, "-o", root / "idx", "-m", root / "dpr-ctx", "--query-model", root / "dpr-q",
                     "--no-normalize", "--device", "cpu", "--json")
        assert result.exit_code == 0, result.output
        yield {"root": root, "q_tok": q_tok, "g_tok": g_tok, "question": question.eval(), "context": context.eval(),
               "rags": rags, "passages": passages, "index": root / "idx", "build": json.loads(result.stdout)}


def _dpr_embed(model, tok, texts: list[str]) -> np.ndarray:
    with torch.no_grad():
        return model(**tok(texts, return_tensors="pt", padding=True)).pooler_output.numpy()


# -- DPR encoders as ragkit embedders ------------------------------------------------------------------------


@pytest.mark.parametrize("projection", [0, 8])
def test_a_dpr_encoder_embeds_in_ragkit_exactly_as_in_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   projection: int) -> None:
    from transformers import DPRContextEncoder

    from ragkit.models.encoder import Encoder, weights_fingerprint

    monkeypatch.setenv("RAGKIT_HOME", str(tmp_path / "cache"))
    tok = _tokenizer(tmp_path / "tok")
    torch.manual_seed(1)
    dpr = DPRContextEncoder(_dpr_config(tok, projection)).eval()
    dpr.save_pretrained(tmp_path / "ctx")
    tok.save_pretrained(tmp_path / "ctx")
    texts = ["the king of france", "river city music film poet", "a"]
    encoder = Encoder(str(tmp_path / "ctx"), device="cpu", normalize=False)
    assert np.allclose(encoder.encode(texts), _dpr_embed(dpr, tok, texts), atol=1e-5)
    assert encoder.info.dim == (projection or 16) and encoder.info.pooling == "cls"
    converted = list((tmp_path / "cache" / "models").iterdir())
    assert len(converted) == 1
    # converted once; another load reads the same folder and has the same fingerprint (no random pooler)
    from sentence_transformers import SentenceTransformer

    assert weights_fingerprint(SentenceTransformer(str(converted[0]))) == encoder.info.fingerprint
    Encoder(str(tmp_path / "ctx"), device="cpu", normalize=False)
    assert list((tmp_path / "cache" / "models").iterdir()) == converted


def test_an_index_of_a_dpr_pair_embeds_queries_with_the_question_encoder(models: dict) -> None:
    info = json.loads(run("index", "info", models["index"], "--json").stdout)
    assert info["query_embedder"] == str(models["root"] / "dpr-q") and info["embedder"] == str(models["root"] / "dpr-ctx")
    questions = ["king of france", "river music"]
    result = run("index", "search", models["index"], "-k", K, input="\n".join(questions) + "\n")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    texts = [(f"{p['title']} {p['text']}") for p in models["passages"]]  # ragkit embeds "title text"
    scores = _dpr_embed(models["question"], models["q_tok"], questions) @ _dpr_embed(models["context"], models["q_tok"], texts).T
    for row, want in zip(rows, scores):
        assert [h["id"] for h in row["hits"]] == [models["passages"][i]["id"] for i in np.argsort(-want)[:K]]
        assert np.allclose([h["score"] for h in row["hits"]], np.sort(want)[::-1][:K], atol=1e-4)


def test_the_pairs_other_half_is_refused_for_queries(models: dict) -> None:
    result = run("index", "search", models["index"], "--model", models["root"] / "dpr-ctx", input="king\n")
    assert result.exit_code != 0 and "query encoder of" in result.output
    refused = run("index", "refresh", models["index"], "--model", models["root"] / "dpr-ctx")
    assert refused.exit_code == 2 and "--query-model" in refused.output


def test_a_query_model_of_another_dimension_is_refused(models: dict, tiny_encoder_path: Path, tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", models["passages"][:5])
    result = run("index", "build", corpus, "-o", tmp_path / "idx", "-m", models["root"] / "dpr-ctx",
                 "--query-model", tiny_encoder_path, "--device", "cpu")
    assert result.exit_code == 2 and "dimension" in result.output and not (tmp_path / "idx").exists()


# -- transformers' RAG checkpoints ----------------------------------------------------------------------------


def _hf_inputs(models: dict, rag, question: str, hits: list[dict]):
    """What transformers' RAG reads for `question` and ragkit's `hits`: doc scores from its own question
    encoder and the context encoder's vectors, generator inputs built by RagRetriever.postprocess_docs."""
    from transformers import RagRetriever

    q = _dpr_embed(rag.rag.question_encoder, models["q_tok"], [question])
    d = _dpr_embed(models["context"], models["q_tok"], [f"{h['title']} {h['text']}" for h in hits])
    docs = [{"title": [h["title"] for h in hits], "text": [h["text"] for h in hits]}]
    retriever = SimpleNamespace(config=rag.config, generator_tokenizer=models["g_tok"])
    context = RagRetriever.postprocess_docs(retriever, docs, [question], None, len(hits), return_tensors="pt")
    return context[0], context[1], torch.from_numpy(q @ d.T)


def _passages_by_id(models: dict, ids: list[str]) -> list[dict]:
    by_id = {p["id"]: p for p in models["passages"]}
    return [by_id[i] for i in ids]


def test_a_rag_token_checkpoint_decodes_as_transformers_generate(models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import RagTokenForGeneration

    import ragkit

    monkeypatch.setenv("RAGKIT_HOME", str(models["root"] / "cache"))
    folder = models["rags"]["RagTokenForGeneration"]
    answerer = ragkit.load("rag", str(folder), index=str(models["index"]), rag_decoding="token", max_new_tokens=6,
                           device="cpu")
    hf = RagTokenForGeneration.from_pretrained(folder).eval()
    for question in ["king of france", "river city music", "who was the poet"]:
        row = answerer.answer([question])[0]
        hits = _passages_by_id(models, [p["id"] for p in row["passages"]])
        ids, mask, doc_scores = _hf_inputs(models, hf, question, hits)
        assert np.allclose([p["doc_prob"] for p in row["passages"]], torch.softmax(doc_scores, -1)[0].numpy(), atol=1e-5)
        out = hf.generate(context_input_ids=ids, context_attention_mask=mask, doc_scores=doc_scores, n_docs=K,
                          max_length=1 + 6, num_beams=1, do_sample=False)  # RAG's generate reads max_length only
        assert row["output"] == models["g_tok"].decode(out[0], skip_special_tokens=True).strip()


@pytest.mark.parametrize("cls_name", ["RagSequenceForGeneration", "RagTokenForGeneration"])
def test_ragkit_scores_an_answer_as_the_checkpoints_own_loss(models: dict, monkeypatch: pytest.MonkeyPatch,
                                                             cls_name: str) -> None:
    """The loss fine-tuning minimises: ragkit's forward over its own retrieval equals transformers' forward
    given the same passages (labels = decoder start + ragkit's target)."""
    import transformers

    from ragkit.archs.rag.decoding import load_rag_checkpoint
    from ragkit.archs.rag.hf_checkpoint import import_hf_rag

    monkeypatch.setenv("RAGKIT_HOME", str(models["root"] / "cache"))
    folder = models["rags"][cls_name]
    converted = import_hf_rag(folder)
    config = json.loads((converted / "rag_config.json").read_text())
    assert (config["loss"], config["n_docs"], config["prompt"], config["max_source_tokens"]) == (
        "sequence" if cls_name.startswith("RagSequence") else "token", K, "hf-rag", 64)
    rag = load_rag_checkpoint(converted, index=str(models["index"]))
    hf = getattr(transformers, cls_name).from_pretrained(folder).eval()
    question, answer = "king of france", "river city"
    with torch.no_grad():
        mine = rag([question], [answer])
        hits, _ = rag.retrieve([question])
        ids, mask, doc_scores = _hf_inputs(models, hf, question, _passages_by_id(models, [h.id for h in hits[0]]))
        target = rag._targets([answer])
        labels = torch.cat([torch.tensor([[hf.config.generator.decoder_start_token_id]]), target], 1)
        theirs = hf(context_input_ids=ids, context_attention_mask=mask, doc_scores=doc_scores, labels=labels,
                    n_docs=K, reduce_loss=True)
    assert torch.allclose(mine["doc_scores"], doc_scores, atol=1e-4)
    assert float(mine["nll"]) == pytest.approx(float(theirs.loss), rel=1e-4)


def test_fine_tune_a_rag_checkpoint_and_export_it_back(models: dict, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from sentence_transformers import SentenceTransformer
    from transformers import RagTokenForGeneration

    monkeypatch.setenv("RAGKIT_HOME", str(models["root"] / "cache"))
    folder = models["rags"]["RagTokenForGeneration"]
    data = write_jsonl(tmp_path / "train.jsonl", [{"question": f"king {w}", "answers": ["river city"]} for w in WORDS[:8]])
    out = tmp_path / "run"
    result = run("train", "--arch", "rag", "--generator", folder, "--index", models["index"], "--data", data, "-o", out,
                 "--n-docs", K, "--batch-size", 2, "--lr", "5e-2", "--max-steps", 6, "--save-steps", 6, "--logging-steps", 1,
                 "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    trained = out / "checkpoint-6"
    config = json.loads((trained / "rag_config.json").read_text())
    assert config["loss"] == "token" and config["prompt"] == "hf-rag"  # from the checkpoint's class
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert losses[-1] < losses[0]

    exported = tmp_path / "exported"
    result = run("export", trained, "-o", exported)
    assert result.exit_code == 0, result.output
    hf = RagTokenForGeneration.from_pretrained(exported).eval()  # plain transformers opens it
    original = RagTokenForGeneration.from_pretrained(folder)
    mine = SentenceTransformer(str(trained / "query_encoder"), device="cpu")
    text = ["king of france"]
    assert np.allclose(_dpr_embed(hf.rag.question_encoder, models["q_tok"], text),
                       mine.encode(text, normalize_embeddings=False), atol=1e-5)
    assert not np.allclose(_dpr_embed(hf.rag.question_encoder, models["q_tok"], text),
                           _dpr_embed(original.rag.question_encoder, models["q_tok"], text))  # trained through doc scores
    # the exported folder answers as the checkpoint it came from
    answers = {}
    for model in (trained, exported):
        result = run("generate", "--arch", "rag", "--model", model, "--index", models["index"], "--rag-decoding", "token",
                     "--max-new-tokens", 5, "--device", "cpu", input='{"question": "king of france"}\n')
        assert result.exit_code == 0, result.output
        answers[model] = json.loads(result.stdout.splitlines()[0])["output"]
    assert answers[trained] == answers[exported]


def test_what_transformers_rag_cannot_hold_is_refused(models: dict, tmp_path: Path, tiny_encoder_path: Path,
                                                      tiny_lm_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGKIT_HOME", str(models["root"] / "cache"))
    folder = models["rags"]["RagSequenceForGeneration"]
    result = run("generate", "--arch", "rag", "--model", folder, "--device", "cpu", input='{"question": "king"}\n')
    assert result.exit_code == 2 and "--index" in result.output
    # a ragkit-prompted, causal-generator checkpoint: not expressible as transformers' RAG
    corpus = write_jsonl(tmp_path / "c.jsonl", models["passages"])
    assert run("index", "build", corpus, "-o", tmp_path / "idx", "-m", tiny_encoder_path, "--device", "cpu").exit_code == 0
    data = write_jsonl(tmp_path / "train.jsonl", [{"question": "king", "answers": ["river"]}] * 2)
    run_dir = tmp_path / "run"
    assert run("train", "--arch", "rag", "--generator", tiny_lm_path, "--index", tmp_path / "idx", "--data", data,
               "-o", run_dir, "--n-docs", 2, "--batch-size", 2, "--max-steps", 1, "--save-steps", 1,
               "--device", "cpu").exit_code == 0
    result = run("export", run_dir / "checkpoint-1", "-o", tmp_path / "x")
    assert result.exit_code == 2 and "--rag-prompt hf-rag" in result.output and not (tmp_path / "x").exists()
    result = run("train", "--arch", "rag", "--generator", tiny_lm_path, "--index", tmp_path / "idx", "--data", data,
                 "-o", tmp_path / "run2", "--max-steps", 1, "--rag-prompt", "nonsense", "--device", "cpu")
    assert result.exit_code == 2 and "nonsense" in result.output


def test_a_forced_first_token_is_decoded_and_trained_as_the_generators_own_generate(
        models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A seq2seq generator whose generation config forces its first token (BART's <s>): RAG-Token greedy over one
    passage equals the generator's own greedy generate, and the training target starts with that token."""
    import shutil

    from ragkit.archs.rag.decoding import decode, load_rag_checkpoint
    from ragkit.archs.rag.hf_checkpoint import import_hf_rag

    monkeypatch.setenv("RAGKIT_HOME", str(models["root"] / "cache"))
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(import_hf_rag(models["rags"]["RagSequenceForGeneration"]), checkpoint)
    settings = checkpoint / "generator" / "generation_config.json"
    bos = models["g_tok"].bos_token_id
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "forced_bos_token_id": bos}))
    rag = load_rag_checkpoint(checkpoint, index=str(models["index"]))
    rag.config.n_docs = 1
    assert rag._targets(["river city"])[0, 0] == bos
    for question in ["king of france", "river city music"]:
        token = decode(rag, [question], mode="token", max_new_tokens=6)[0].text
        hits, _ = rag.retrieve([question])
        enc = rag.tokenizer(rag._prompts([question], hits), return_tensors="pt", truncation=True, max_length=64)
        out = rag.generator.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=6,
                                     do_sample=False)
        assert out[0, 1] == bos
        assert token == rag.tokenizer.decode(out[0], skip_special_tokens=True).strip()
