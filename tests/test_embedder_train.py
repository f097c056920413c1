"""Embedder fine-tuning on the one trainer, hard-negative mining, and `ragkit index refresh`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_passages, write_jsonl
from ragkit.cli import app
from ragkit.archs.embedder.training import TrainingPair, mine_hard_negatives, read_training_pairs


def run(*args: object, input: str | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


@pytest.fixture
def built(tmp_path: Path, tiny_encoder_path: Path) -> tuple[Path, list[dict]]:
    passages = make_passages(40)
    corpus = write_jsonl(tmp_path / "c.jsonl", passages)
    out = tmp_path / "idx"
    result = run("index", "build", corpus, "-o", out, "--model", tiny_encoder_path, "--device", "cpu", "--sparse")
    assert result.exit_code == 0, result.stderr
    return out, passages


def pairs_for(passages: list[dict]) -> list[dict]:
    return [{"query": p["text"].split()[0] + " " + p["title"], "positive": f"{p['title']} {p['text']}",
             "positive_id": p["id"]} for p in passages[:24]]


def test_hard_negatives_never_include_a_positive(built: tuple[Path, list[dict]]) -> None:
    from ragkit.retrieval import Retriever

    index, passages = built
    pairs = [TrainingPair(r["query"], r["positive"], {r["positive_id"]}) for r in pairs_for(passages)]
    # the query is the positive itself, so the positive is the top hit and must be skipped
    for pair in pairs:
        pair.query = pair.positive
    added = mine_hard_negatives(pairs, Retriever(index, device="cpu"), 3)
    assert added == 3 * len(pairs)
    by_text = {f"{p['title']} {p['text']}": p["id"] for p in passages}
    for pair in pairs:
        assert len(pair.negatives) == 3
        assert pair.positive not in pair.negatives
        assert not {by_text[n] for n in pair.negatives} & pair.positive_ids


def test_embedder_trains_and_index_refresh_swaps_vectors(built: tuple[Path, list[dict]], tmp_path: Path) -> None:
    index, passages = built
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs_for(passages))
    out = tmp_path / "run"
    result = run("train", "--arch", "embedder", "--data", data, "--index", index, "--hard-negatives", 1, "-o", out,
                 "--max-steps", 12, "--batch-size", 8, "--lr", "1e-3", "--logging-steps", 2, "--save-steps", 12,
                 "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < losses[0]
    model_dir = out / "final" / "embedder"
    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(str(model_dir), device="cpu").encode(["city"]).shape == (1, 32)

    before = json.loads(run("index", "info", index, "--json").stdout)
    refreshed = run("index", "refresh", index, "--model", model_dir, "--device", "cpu", "--json")
    assert refreshed.exit_code == 0, refreshed.stderr
    after = json.loads(run("index", "info", index, "--json").stdout)
    assert after["version"] == before["version"] + 1 and after["passages"] == before["passages"]
    assert after["fingerprint"] != before["fingerprint"] and after["embedder"] == str(model_dir)
    hit = run("index", "search", index, "--k", 1, "--device", "cpu", input=pairs_for(passages)[0]["positive"] + "\n")
    assert hit.exit_code == 0, hit.stderr
    assert run("index", "search", index, "--mode", "sparse", input="city\n").exit_code == 0  # BM25 side kept


def test_cached_mnrl_runs(built: tuple[Path, list[dict]], tmp_path: Path, tiny_encoder_path: Path) -> None:
    _, passages = built
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs_for(passages))
    result = run("train", "--arch", "embedder", "--embedder", tiny_encoder_path, "--data", data, "-o", tmp_path / "r",
                 "--loss", "cached-mnrl", "--mini-batch-size", 4, "--max-steps", 2, "--batch-size", 8,
                 "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 2


def test_refresh_killed_midway_leaves_the_old_index(built: tuple[Path, list[dict]], other_tiny_encoder_path: Path) -> None:
    from ragkit.index import Index
    from ragkit.models.encoder import Encoder

    root, _ = built
    index = Index.open(root)
    old = index.info()
    encoder = Encoder(str(other_tiny_encoder_path), device="cpu")
    calls = []

    def dies(texts: list[str]):
        calls.append(len(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encoder.encode(texts)

    with pytest.raises(KeyboardInterrupt):
        index.refresh(dies, encoder.info, batch=16)
    reopened = Index.open(root)
    assert reopened.info()["fingerprint"] == old["fingerprint"] and reopened.info()["version"] == old["version"]
    assert len(reopened.search_sparse(["city"], 3)) == 1


def test_bad_pairs_name_file_line_and_field(tmp_path: Path) -> None:
    from ragkit.errors import InputError

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "positive": "p"}, {"query": "q2"}])
    with pytest.raises(InputError, match="bad.jsonl:2: field 'positive'"):
        read_training_pairs(bad)
    result = run("train", "--arch", "embedder", "--data", bad, "-o", tmp_path / "r", "--max-steps", 1, "--device", "cpu")
    assert result.exit_code == 3 and "bad.jsonl:2" in result.stderr


def test_beir_train_qrels_become_pairs(tmp_path: Path) -> None:
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    write_jsonl(folder / "corpus.jsonl", [{"_id": "d1", "title": "T", "text": "one"}, {"_id": "d2", "text": "two"}])
    write_jsonl(folder / "queries.jsonl", [{"_id": "q1", "text": "first"}])
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t1\n")
    pairs = read_training_pairs(folder)
    assert [(p.query, p.positive, p.positive_ids) for p in pairs] == [("first", "T one", {"d1", "d2"}),
                                                                     ("first", "two", {"d1", "d2"})]


def test_cosine_loss_trains_on_scored_pairs(tmp_path: Path, tiny_encoder_path: Path) -> None:
    """Seed 002's format: pairs with a similarity label and --loss cosine (CosineSimilarityLoss). Training pulls
    the cosine of each pair towards its score; a score under a ranking loss, or out of range, is refused."""
    import torch
    from sentence_transformers import SentenceTransformer

    rng = __import__("random").Random(0)
    words = "river king war city music film science player club book queen poet".split()
    rows = []
    for i in range(16):
        a = " ".join(rng.choices(words, k=6))
        rows.append({"sentence1": a, "sentence2": a + " " + words[i % 12], "score": 0.9})
        rows.append({"sentence1": a, "sentence2": " ".join(rng.choices(words, k=6)), "score": 0.1})
    data = write_jsonl(tmp_path / "sts.jsonl", rows)

    def error_and_gap(model_dir: Path) -> tuple[float, float]:
        """(mean squared error of each pair's cosine against its score, mean cosine of 0.9 pairs - of 0.1 pairs)"""
        model = SentenceTransformer(str(model_dir), device="cpu")
        a = model.encode([r["sentence1"] for r in rows], convert_to_tensor=True)
        b = model.encode([r["sentence2"] for r in rows], convert_to_tensor=True)
        cos = torch.nn.functional.cosine_similarity(a, b)
        scores = torch.tensor([r["score"] for r in rows])
        return float(((cos - scores) ** 2).mean()), float(cos[scores > 0.5].mean() - cos[scores < 0.5].mean())

    result = run("train", "--arch", "embedder", "--embedder", tiny_encoder_path, "--data", data, "-o", tmp_path / "r",
                 "--loss", "cosine", "--max-steps", 40, "--batch-size", 8, "--lr", "5e-3", "--logging-steps", 4,
                 "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    (before, gap_before), (after, gap_after) = error_and_gap(tiny_encoder_path), error_and_gap(tmp_path / "r" / "final" / "embedder")
    assert after < 0.7 * before and gap_after > gap_before + 0.1, (before, after, gap_before, gap_after)
    mixed = run("train", "--arch", "embedder", "--embedder", tiny_encoder_path, "--data", data, "-o", tmp_path / "m",
                "--max-steps", 1, "--device", "cpu")  # the default ranking loss would drop the scores
    assert mixed.exit_code == 3 and "sts.jsonl:1: field 'score'" in mixed.stderr and "--loss cosine" in mixed.stderr
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"sentence1": "a", "sentence2": "b", "score": 3}])
    refused = run("train", "--arch", "embedder", "--embedder", tiny_encoder_path, "--data", bad, "-o", tmp_path / "b",
                  "--loss", "cosine", "--max-steps", 1, "--device", "cpu")
    assert refused.exit_code == 3 and "bad.jsonl:1: field 'score'" in refused.stderr


def _tiny_cross_encoder(directory: Path, tiny_encoder_path: Path) -> Path:
    """A sequence-classification BERT (one score) on the tiny encoder's vocabulary: a cross-encoder teacher."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_path)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("teacher_kind", ["embedder", "cross-encoder"])
def test_distillation_from_a_teacher_learns_its_margins(built: tuple[Path, list[dict]], tmp_path: Path,
                                                        tiny_encoder_path: Path, other_tiny_encoder_path: Path,
                                                        teacher_kind: str) -> None:
    """--distill-from TEACHER (an embedder, or a cross-encoder): MarginMSE on (query, positive, negatives) with
    the teacher's scores; after training the student's margins are closer to the teacher's than before."""
    import torch
    from sentence_transformers import SentenceTransformer

    from ragkit.archs.embedder.training import TrainingPair, score_with_teacher

    index, passages = built
    rows = [{**r, "negatives": [f"{passages[(i + 7) % 40]['title']} {passages[(i + 7) % 40]['text']}"]}
            for i, r in enumerate(pairs_for(passages))]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    teacher = (other_tiny_encoder_path if teacher_kind == "embedder"
               else _tiny_cross_encoder(tmp_path / "ce", tiny_encoder_path))
    pairs = [TrainingPair(r["query"], r["positive"], negatives=list(r["negatives"])) for r in rows]
    assert score_with_teacher(pairs, str(teacher), device="cpu") == teacher_kind
    target = torch.tensor([p.teacher[0] - p.teacher[1] for p in pairs])

    def margin_error(model_dir: Path) -> float:
        model = SentenceTransformer(str(model_dir), device="cpu")
        q = model.encode([r["query"] for r in rows], convert_to_tensor=True)
        pos = model.encode([r["positive"] for r in rows], convert_to_tensor=True)
        neg = model.encode([r["negatives"][0] for r in rows], convert_to_tensor=True)
        margins = (q * pos).sum(-1) - (q * neg).sum(-1)  # MarginMSE's dot-product scores
        return float(((margins - target) ** 2).mean())

    result = run("train", "--arch", "embedder", "--embedder", tiny_encoder_path, "--data", data, "-o", tmp_path / "r",
                 "--distill-from", teacher, "--max-steps", 30, "--batch-size", 8, "--lr", "5e-3", "--device", "cpu",
                 "--json")
    assert result.exit_code == 0, result.stderr
    before, after = margin_error(tiny_encoder_path), margin_error(tmp_path / "r" / "final" / "embedder")
    assert after < 0.7 * before, (before, after)


def test_distillation_needs_negatives_and_its_loss(tmp_path: Path, tiny_encoder_path: Path,
                                                   other_tiny_encoder_path: Path) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", [{"query": "q", "positive": "p"}] * 4)
    result = run("train", "--arch", "embedder", "--embedder", tiny_encoder_path, "--data", data, "-o", tmp_path / "r",
                 "--distill-from", other_tiny_encoder_path, "--max-steps", 1, "--device", "cpu")
    assert result.exit_code == 2 and "--hard-negatives" in result.stderr
    result = run("train", "--arch", "embedder", "--embedder", tiny_encoder_path, "--data", data, "-o", tmp_path / "r2",
                 "--loss", "margin-mse", "--max-steps", 1, "--device", "cpu")
    assert result.exit_code == 2 and "give --distill-from" in result.stderr


@pytest.mark.parametrize("row, field", [
    ({"negatives": "n"}, "negatives"),  # issue 27.9: a string under 'negatives' was taken as a list of one
    ({"negatives": ["n", 3]}, "negatives"),
    ({"negatives": [""]}, "negatives"),
    ({"negative": ["n"]}, "negative"),
])
def test_negatives_of_the_wrong_shape_name_the_field(tmp_path: Path, row: dict, field: str) -> None:
    from ragkit.errors import InputError

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "positive": "p"}, {"query": "q2", "positive": "p2", **row}])
    with pytest.raises(InputError, match=f"bad.jsonl:2: field '{field}'"):
        read_training_pairs(bad)


def test_one_negative_text_is_one_negative(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", [{"query": "q", "positive": "p", "negative": "n"}])
    assert read_training_pairs(data)[0].negatives == ["n"]


def test_the_datas_own_negatives_are_used_without_mining(tmp_path: Path) -> None:
    """Negatives given in the data reach the loss as hard negatives (they were dropped unless
    --hard-negatives was set)."""
    from ragkit.archs.embedder.training import EmbedderArch
    from ragkit.train.config import TrainConfig

    data = write_jsonl(tmp_path / "p.jsonl", [{"query": "q1", "positive": "p1", "negatives": ["n1", "n2"]},
                                              {"query": "q2", "positive": "p2", "negatives": ["n3"]}])
    rows = EmbedderArch().dataset(TrainConfig(arch="embedder", data=str(data), output=str(tmp_path / "o"))).rows
    assert [r.negatives for r in rows] == [["n1", "n2"], ["n3", "n3"]]
