"""RETRO's pipeline, training, generation and LM evaluation on tiny models: memmap layouts, caching by the
manifest, same-document exclusion, retrieval once per chunk boundary, bad input."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import WORDS
from conftest import run_cli as _cli
from conftest import run_torchrun
from ragkit.errors import InputError, ResourceError, UsageError
from ragkit.archs.retro import pipeline as P
from ragkit.archs.retro.corpus import RetroCorpus, RetroSequences, prepare

M = 4  # chunk size
SEQ = 16


def write_texts(folder: Path, n_docs: int = 6, words: int = 40, seed: int = 0) -> Path:
    """Documents that each repeat their own small vocabulary: a chunk's nearest chunks are in its document."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        own = rng.sample(WORDS, 5)
        (folder / f"doc{d}.txt").write_text(" ".join(rng.choice(own) for _ in range(words)), encoding="utf-8")
    return folder


def config(tmp: Path, data: Path, tokenizer: Path, encoder: Path, **kw) -> P.RetroDataConfig:
    return P.RetroDataConfig(data=str(data), workdir=str(tmp / "work"), tokenizer=str(tokenizer), embedder=str(encoder),
                             chunk_size=M, seq_len=SEQ, num_neighbors=2, extra_neighbors=40, device="cpu", **kw)


@pytest.fixture
def texts(tmp_path: Path) -> Path:
    return write_texts(tmp_path / "texts")


def test_chunk_layout(tmp_path: Path, texts: Path, tiny_lm_path: Path, tiny_encoder_path: Path) -> None:
    prepared = prepare(config(tmp_path, texts, tiny_lm_path, tiny_encoder_path))
    c, tok = prepared.corpus, prepared.tokenizer
    assert c.chunks.dtype == np.int32 and c.chunks.shape[1] == M + 1
    documents = c.documents()
    assert len(documents) == 6 and sum(d["chunks"] for d in documents) == len(c)
    for d in documents:
        rows = c.chunks[d["first_chunk"]:d["first_chunk"] + d["chunks"]]
        assert (c.doc_ids[d["first_chunk"]:d["first_chunk"] + d["chunks"]] == d["doc"]).all()
        flat = rows[:, :M].reshape(-1)
        assert flat[0] == tok.bos_token_id and flat[d["tokens"] - 1] == tok.eos_token_id
        assert (flat[d["tokens"]:] == P.PAD).all()
        assert (rows[:-1, M] == rows[1:, 0]).all()  # column m: the next chunk's first token
        assert rows[-1, M] == P.PAD
        text = Path(d["source"]).read_text()
        assert tok.decode([t for t in flat if t >= 0], skip_special_tokens=True) == text
    # sequences start every SEQ / M chunks within each document
    starts = [d["first_chunk"] + s for d in documents for s in range(0, d["chunks"], SEQ // M)]
    assert list(c.seq_starts) == starts


def test_bert_style_tokenizers_mark_documents_with_cls_and_sep(tmp_path: Path, texts: Path,
                                                               tiny_encoder_path: Path) -> None:
    """No BOS/EOS (BERT, RETRO-pytorch's tokenizer): [CLS] starts and [SEP] ends each document."""
    prepared = prepare(config(tmp_path, texts, tiny_encoder_path.parent / "bert", tiny_encoder_path))
    tok, c = prepared.tokenizer, prepared.corpus
    assert tok.eos_token_id is None and tok.bos_token_id is None
    first = c.documents()[0]
    flat = c.chunks[:first["chunks"], :M].reshape(-1)
    assert flat[0] == tok.cls_token_id and flat[first["tokens"] - 1] == tok.sep_token_id
    assert not P.keeps_newlines(tok)  # and prepare() said so on stderr


def test_memmaps_are_reproducible(tmp_path: Path, texts: Path, tiny_lm_path: Path, tiny_encoder_path: Path) -> None:
    a = prepare(config(tmp_path / "a", texts, tiny_lm_path, tiny_encoder_path)).corpus
    b = prepare(config(tmp_path / "b", texts, tiny_lm_path, tiny_encoder_path)).corpus
    for name in ("chunks.npy", "doc_ids.npy", "seq_starts.npy", "embeddings.npy", "neighbours.npy"):
        assert (a.folder / name).read_bytes() == (b.folder / name).read_bytes(), name


def test_no_neighbour_from_the_same_document(tmp_path: Path, texts: Path, tiny_lm_path: Path,
                                             tiny_encoder_path: Path) -> None:
    prepared = prepare(config(tmp_path, texts, tiny_lm_path, tiny_encoder_path))
    c = prepared.corpus
    assert c.neighbours is not None and c.neighbours.shape == (len(c), 2)
    found = c.neighbours >= 0
    assert found.mean() > 0.9
    assert not (c.doc_ids[np.where(found, c.neighbours, 0)] == c.doc_ids[:, None])[found].any()
    # without the filter, the top hits would be from the chunk's own document (the texts are built so)
    from ragkit.index import Index

    raw = P.search_chunk_ids(Index.open(prepared.index_dir), np.load(c.folder / "embeddings.npy")[:20], 4)
    assert (c.doc_ids[raw[:, 1:]] == c.doc_ids[:20, None]).any(axis=1).mean() > 0.5


def test_drop_same_document_keeps_rank_order_and_pads() -> None:
    doc_ids = np.array([0, 0, 1, 1, 2, 2])
    candidates = np.array([[0, 1, 2, 4, 3], [4, 5, 0, -1, -1]])
    out = P.drop_same_document(candidates, np.array([0, 2]), doc_ids, 3)
    assert out.tolist() == [[2, 4, 3], [0, -1, -1]]


def test_neighbour_tokens_add_the_continuation_only_within_a_document(tmp_path: Path, texts: Path,
                                                                      tiny_lm_path: Path, tiny_encoder_path: Path) -> None:
    c = prepare(config(tmp_path, texts, tiny_lm_path, tiny_encoder_path)).corpus
    last_of_doc0 = c.documents()[0]["chunks"] - 1
    got = c.neighbour_tokens(np.array([[0, last_of_doc0, -1]]))
    assert got.shape == (1, 3, 2 * M)
    assert (got[0, 0, :M] == c.chunks[0, :M]).all() and (got[0, 0, M:] == c.chunks[1, :M]).all()
    assert (got[0, 1, :M] == c.chunks[last_of_doc0, :M]).all() and (got[0, 1, M:] == P.PAD).all()
    assert (got[0, 2] == P.PAD).all()


def test_stages_are_skipped_or_rebuilt_by_the_manifest(tmp_path: Path, texts: Path, tiny_lm_path: Path,
                                                       tiny_encoder_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name in ("chunk_documents", "embed_chunks", "index_chunks", "compute_neighbours"):
        original = getattr(P, name)
        monkeypatch.setattr(P, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    cfg = config(tmp_path, texts, tiny_lm_path, tiny_encoder_path)
    prepare(cfg)
    assert calls == ["chunk_documents", "embed_chunks", "index_chunks", "compute_neighbours"]
    calls.clear()
    prepare(cfg)
    assert calls == []  # all current
    (tmp_path / "work" / "neighbours.npy").unlink()  # a missing artifact is rebuilt, whatever the manifest says
    prepare(cfg)
    assert calls == ["compute_neighbours"]
    calls.clear()
    prepare(config(tmp_path, texts, tiny_lm_path, tiny_encoder_path, index_spec="hnsw:M=8"))
    assert calls == ["index_chunks", "compute_neighbours"]
    calls.clear()
    (texts / "doc0.txt").write_text("the king of paris " * 9)  # new input: everything downstream
    prepare(cfg)
    assert calls == ["chunk_documents", "embed_chunks", "index_chunks", "compute_neighbours"]
    calls.clear()
    prepare(config(tmp_path, texts, tiny_lm_path, tiny_encoder_path, reprocess=True))
    assert len(calls) == 4
    assert not list((tmp_path / "work").glob(".*tmp*")), "no temporary file left behind"


def test_bad_input_gives_clear_errors(tmp_path: Path, texts: Path, tiny_lm_path: Path, tiny_encoder_path: Path,
                                      tiny_selfrag_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no file matches"):
        prepare(config(tmp_path, tmp_path / "empty", tiny_lm_path, tiny_encoder_path))
    short = tmp_path / "short"
    short.mkdir()
    (short / "a.txt").write_text("king")
    with pytest.raises(InputError, match="shorter than a chunk"):
        prepare(config(tmp_path, short, tiny_lm_path, tiny_encoder_path))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_text('{"text": "the king"}\n{"title": "no text"}\n')
    with pytest.raises(InputError) as err:
        prepare(config(tmp_path, bad, tiny_lm_path, tiny_encoder_path, glob="*.jsonl"))
    assert "a.jsonl:2" in str(err.value) and "text" in str(err.value)
    prepare(config(tmp_path, texts, tiny_lm_path, tiny_encoder_path))
    with pytest.raises(ResourceError, match="tokenized with") as err:
        prepare(config(tmp_path, texts, tiny_selfrag_path, tiny_encoder_path))
    assert "--reprocess" in (err.value.hint or "")
    prepare(config(tmp_path, texts, tiny_selfrag_path, tiny_encoder_path, reprocess=True))  # on purpose: rebuilt


def test_jsonl_input_gives_one_document_per_line(tmp_path: Path, tiny_lm_path: Path, tiny_encoder_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"text": " ".join(random.Random(i).choices(WORDS, k=20))} for i in range(3)]
    (data / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = prepare(config(tmp_path, data, tiny_lm_path, tiny_encoder_path, glob="*.jsonl")).corpus
    assert [d["source"].rsplit(":", 1)[1] for d in c.documents()] == ["1", "2", "3"]


def test_sequences_never_cross_a_document(tmp_path: Path, texts: Path, tiny_lm_path: Path, tiny_encoder_path: Path) -> None:
    prepared = prepare(config(tmp_path, texts, tiny_lm_path, tiny_encoder_path))
    c = prepared.corpus
    ds = RetroSequences(c, c, seq_len=SEQ, pad_id=0)
    for i in range(len(ds)):
        item = ds[i]
        tokens, rows = ds.rows(i)
        assert item["input_ids"].shape == (SEQ,) and item["retrieved"].shape == (SEQ // M, 2, 2 * M)
        used = rows[rows >= 0]
        assert (c.doc_ids[used] == c.doc_ids[c.seq_starts[i]]).all()
        assert (item["labels"][item["input_ids"] == 0] == -100).all() or (item["input_ids"] != 0).all()
        assert (item["retrieved"][rows < 0] == P.PAD).all()


# -- training, generation, evaluation through the CLI -------------------------------------------
TINY_MODEL = ["--retro-dim", "32", "--retro-dec-depth", "2", "--retro-enc-depth", "1", "--retro-heads", "2",
              "--retro-dim-head", "16", "--retro-cross-attn-layers", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_lm_path: Path, tiny_encoder_path: Path) -> Path:
    root = tmp_path_factory.mktemp("retro-run")
    data = write_texts(root / "texts", n_docs=8, words=60)
    result = _cli("train", "--arch", "retro", "--data", data, "--workdir", root / "work", "-o", root / "run",
                  "--tokenizer", tiny_lm_path, "--embedder", tiny_encoder_path, "--chunk-size", M, "--seq-len", SEQ,
                  "--num-neighbors", 2, *TINY_MODEL, "--max-steps", 40, "--batch-size", 4, "--lr", "3e-3",
                  "--logging-steps", 5, "--save-steps", 20, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    return root


def test_seed_decides_the_initial_weights(trained: Path, tmp_path: Path, tiny_lm_path: Path,
                                          tiny_encoder_path: Path) -> None:
    """Two runs in one process with the same --seed start from the same weights; another seed does not."""
    first_losses = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        out = tmp_path / name
        result = _cli("train", "--arch", "retro", "--data", trained / "texts", "--workdir", trained / "work", "-o", out,
                      "--tokenizer", tiny_lm_path, "--embedder", tiny_encoder_path, "--chunk-size", M, "--seq-len", SEQ,
                      "--num-neighbors", 2, *TINY_MODEL, "--max-steps", 1, "--batch-size", 2, "--logging-steps", 1,
                      "--device", "cpu", "--seed", seed)
        assert result.exit_code == 0, result.stderr
        first_losses[name] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert first_losses["a"] == first_losses["b"] != first_losses["c"], first_losses


def test_training_lowers_the_loss_and_writes_a_loadable_model(trained: Path) -> None:
    from transformers import AutoModel

    losses = [json.loads(line)["loss"] for line in (trained / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < losses[0] * 0.8
    model = AutoModel.from_pretrained(trained / "run" / "final" / "model")
    assert model.config.chunk_size == M and model.config.cross_attn_layers == [1]
    meta = json.loads((trained / "run" / "final" / "retro.json").read_text())
    assert Path(meta["workdir"]) == (trained / "work").resolve()


def test_generate_from_a_prompt_and_from_nothing(trained: Path) -> None:
    result = _cli("generate", "--arch", "retro", "-m", trained / "run" / "final", "--max-new-tokens", 10,
                  "--do-sample", "--top-k", 5, "--num-samples", 2, "--device", "cpu",
                  input_=json.dumps({"id": "p", "prompt": "the king of"}) + "\n")
    assert result.exit_code == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["id"] == "p" and len(row["samples"]) == 2 and row["new_tokens"] >= 1
    # prompt = BOS + 3 words: chunk 0 is complete after the 4th token, then one more every 4 tokens
    assert [r["chunk"] for r in row["retrieved"]][:2] == [0, 1]
    result = _cli("generate", "--arch", "retro", "-m", trained / "run" / "final", "--unconditional",
                  "--max-new-tokens", 6, "--device", "cpu")
    assert result.exit_code == 0, result.stderr and json.loads(result.stdout)["prompt"] == ""
    # options RETRO does not honour are refused, not ignored
    result = _cli("generate", "--arch", "retro", "-m", trained / "run" / "final", "--quantize", "int8", input_="x\n")
    assert result.exit_code == 2 and "--quantize: not used by --arch retro" in result.stderr
    for extra in (["--index", trained / "work" / "index"], ["--template", "{prompt}"], ["--k", 3]):
        result = _cli("generate", "--arch", "retro", "-m", trained / "run" / "final", *extra, input_="x\n")
        assert result.exit_code == 2 and f"{extra[0]}: not used by --arch retro" in result.stderr


def test_eval_lm_reports_both_with_and_without_retrieval(trained: Path, tmp_path: Path) -> None:
    held = write_texts(tmp_path / "held", n_docs=2, words=30, seed=7)
    result = _cli("eval", "--task", "lm", "--data", held, "-m", trained / "run" / "final", "--device", "cpu",
                  "-o", tmp_path / "lm.json", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "lm.json").read_text())
    m = report["metrics"]
    assert report["primary_metric"] == "bits_per_byte" and len(report["rows"]) == 2
    refused = _cli("eval", "--task", "lm", "--data", held, "-m", trained / "run" / "final", "--quantize", "int8")
    assert refused.exit_code == 2 and "--quantize: not used by --task lm" in refused.stderr
    assert m["loss"]["mean"] != m["loss_no_retrieval"]["mean"]
    assert m["perplexity"]["mean"] == pytest.approx(np.exp(m["loss"]["mean"]))
    docs = [json.loads(line) for line in next((trained / "work" / "heldout").iterdir()).joinpath("documents.jsonl").read_text().splitlines()]
    assert report["config"]["predicted_tokens"] == sum(d["tokens"] - 1 for d in docs)  # all but each start token
    nats = m["loss"]["mean"] * report["config"]["predicted_tokens"]
    assert m["bits_per_byte"]["mean"] == pytest.approx(nats / np.log(2) / sum(d["bytes"] for d in docs))


def test_resume_continues_from_the_last_checkpoint(trained: Path, tmp_path: Path, tiny_lm_path: Path,
                                                   tiny_encoder_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    result = _cli("train", "--arch", "retro", "--data", trained / "texts", "--workdir", trained / "work", "-o", run,
                  "--tokenizer", tiny_lm_path, "--embedder", tiny_encoder_path, "--chunk-size", M, "--seq-len", SEQ,
                  "--num-neighbors", 2, *TINY_MODEL, "--max-steps", 45, "--batch-size", 4, "--lr", "3e-3",
                  "--logging-steps", 5, "--save-steps", 20, "--device", "cpu", "--resume", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 45
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 45 in steps and steps.count(5) == 1  # continued after step 40: steps 5..40 were not run again


def test_torchrun_ranks_build_the_work_folder_once(trained: Path, tmp_path: Path, tiny_lm_path: Path,
                                                   tiny_encoder_path: Path) -> None:
    """Two ranks, --reprocess: rank 0 rebuilds while rank 1 waits, then rank 1 reads what rank 0 built
    (before, both rebuilt the same files at once)."""
    work = tmp_path / "work"
    shutil.copytree(trained / "work", work)
    done = run_torchrun(["train", "--arch", "retro", "--data", trained / "texts", "--workdir", work, "-o", tmp_path / "run",
                         "--tokenizer", tiny_lm_path, "--embedder", tiny_encoder_path, "--chunk-size", M, "--seq-len", SEQ,
                         "--num-neighbors", 2, *TINY_MODEL, "--max-steps", 2, "--batch-size", 2, "--device", "cpu",
                         "--reprocess", "--json"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("retro: 8 documents ->") == 1, done.stderr[-3000:]
    assert json.loads(done.stdout)["processes"] == 2


def test_resume_refuses_a_work_folder_with_another_tokenizer(trained: Path, tiny_selfrag_path: Path,
                                                             tiny_encoder_path: Path) -> None:
    result = _cli("train", "--arch", "retro", "--data", trained / "texts", "--workdir", trained / "work2",
                  "-o", trained / "run", "--tokenizer", tiny_selfrag_path, "--embedder", tiny_encoder_path,
                  "--chunk-size", M, "--seq-len", SEQ, *TINY_MODEL, "--max-steps", 41, "--device", "cpu", "--resume")
    assert result.exit_code == 4 and "another tokenizer" in result.stderr


# -- generation: one retrieval per chunk boundary, and the cache changes nothing -------------------
class RecordingRetriever:
    def __init__(self, k: int, r: int, vocab: int) -> None:
        self.k, self.r, self.vocab = k, r, vocab
        self.seen: list[np.ndarray] = []
        self.seconds = 0.0

    def __call__(self, chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.seen.append(chunks.copy())
        g = np.random.default_rng(int(chunks.sum()))
        return np.zeros((len(chunks), self.k), dtype=int), g.integers(1, self.vocab, (len(chunks), self.k, self.r))


def tiny_retro():
    from ragkit.archs.retro.model import RetroConfig, RetroModel

    torch.manual_seed(0)
    return RetroModel(RetroConfig(vocab_size=40, dim=32, dec_depth=3, enc_depth=1, heads=2, dim_head=16, chunk_size=M,
                                  num_neighbors=2, cross_attn_layers=[1, 2], pad_token_id=None)).eval()


@pytest.mark.parametrize("prompt_len", [1, 5, 8])
def test_generation_retrieves_once_per_chunk_boundary(prompt_len: int) -> None:
    from ragkit.archs.retro.generate import SamplingConfig, sample

    model = tiny_retro()
    retriever = RecordingRetriever(2, 2 * M, 40)
    prompt = list(range(3, 3 + prompt_len))
    out = sample(model, prompt, SamplingConfig(max_new_tokens=11, temperature=0.0), retriever)
    tokens = prompt + out.tokens[0]
    # each call gets exactly one completed chunk, in order; the chunk that the last token completes is the last
    boundaries = (len(tokens) - 1) // M  # the final token is sampled but never fed
    assert [r["chunk"] for r in out.retrieved] == list(range(boundaries))
    for c, seen in enumerate(retriever.seen):
        assert seen.tolist() == [tokens[c * M:(c + 1) * M]]


def test_cached_sampling_equals_rerunning_the_whole_model() -> None:
    """The RETRO-pytorch way (full forward per token) and the cache give the same greedy tokens."""
    from ragkit.archs.retro.generate import SamplingConfig, sample

    model = tiny_retro()
    retriever = RecordingRetriever(2, 2 * M, 40)
    prompt = [5, 6, 7]
    cached = prompt + sample(model, prompt, SamplingConfig(max_new_tokens=13, temperature=0.0), retriever).tokens[0]
    tokens = list(prompt)
    neighbours: list[torch.Tensor] = []
    with torch.no_grad():
        while len(tokens) < len(cached):
            n = -(-len(tokens) // M) * M  # pad to whole chunks; padding comes after every real position
            ids = torch.tensor([tokens + [0] * (n - len(tokens))])
            while len(neighbours) < len(tokens) // M:
                c = len(neighbours)
                neighbours.append(torch.as_tensor(retriever(np.array([tokens[c * M:(c + 1) * M]]))[1]))
            chunks = n // M
            retrieved = torch.full((1, chunks, 2, 2 * M), -1)
            for c, v in enumerate(neighbours):
                retrieved[:, c] = v
            logits = model(ids, retrieved=retrieved).logits
            tokens.append(int(logits[0, len(tokens) - 1].argmax()))
    assert tokens == cached


def test_sizes_come_from_flags_or_a_config_file(tmp_path: Path) -> None:
    from ragkit.errors import UsageError
    from ragkit.train.config import resolve_config
    from ragkit.archs.retro.training import model_config, parse_cross_attn_layers

    path = tmp_path / "retro.toml"
    path.write_text('arch = "retro"\nworkdir = "w"\nretro-dim = 96\nretro-dec-depth = 5\n'
                    'retro-cross-attn-layers = "1,4"\nchunk-size = 16\nnum-neighbors = 3\n')
    config = resolve_config(path, {"retro_heads": 3})  # a flag on top of the file
    built = model_config(config, vocab_size=100)
    assert (built.dim, built.dec_depth, built.heads, built.chunk_size, built.num_neighbors) == (96, 5, 3, 16, 3)
    assert built.cross_attn_layers == [1, 4] and built.neighbor_len == 32
    assert config.learning_rate == 3e-4  # retro's default, trained from scratch
    assert parse_cross_attn_layers("none", 4) == [] and parse_cross_attn_layers("", 6) is None
    for bad in ("x", "9"):
        with pytest.raises(UsageError):
            parse_cross_attn_layers(bad, 4)


def test_eval_lm_bad_invocations(trained: Path, tmp_path: Path) -> None:
    result = _cli("eval", "--task", "lm", "--data", tmp_path)
    assert result.exit_code == 2 and "--model" in result.stderr
    result = _cli("eval", "--task", "lm", "--data", tmp_path / "missing", "-m", trained / "run" / "final", "--device", "cpu")
    assert result.exit_code == 4 and "missing" in result.stderr
    (tmp_path / "empty").mkdir()
    result = _cli("eval", "--task", "lm", "--data", tmp_path / "empty", "-m", trained / "run" / "final", "--device", "cpu")
    assert result.exit_code == 3 and "no file matches" in result.stderr


def test_each_sample_reports_only_its_own_retrieval_time() -> None:
    """The retriever lives across prompts (`generate --arch retro` reads many): its clock is cumulative."""
    from ragkit.archs.retro.generate import SamplingConfig, sample

    class Clocked(RecordingRetriever):
        def __call__(self, chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            self.seconds += 1.0  # one "second" per call
            return super().__call__(chunks)

    model, retriever = tiny_retro(), Clocked(2, 2 * M, 40)
    first = sample(model, [5, 6, 7], SamplingConfig(max_new_tokens=9, temperature=0.0), retriever)
    second = sample(model, [5, 6, 7], SamplingConfig(max_new_tokens=5, temperature=0.0), retriever)
    assert first.retrieval_seconds == len(first.retrieved) == 2
    assert second.retrieval_seconds == len(second.retrieved) == 1


def test_retro_pytorch_data_limits_and_reprocess(tmp_path: Path, texts: Path, tiny_lm_path: Path,
                                                 tiny_encoder_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--max-chunks keeps whole documents up to that many chunks, --max-seqs the first sequences,
    --max-index-memory bounds the chunk index (auto picks within it; a spec over it is refused), and
    REPROCESS=1 rebuilds like --reprocess (RETRO-pytorch's names for these)."""
    full = prepare(config(tmp_path / "a", texts, tiny_lm_path, tiny_encoder_path)).corpus
    per_doc = [d["chunks"] for d in full.documents()]
    cap = per_doc[0] + per_doc[1] + per_doc[2] // 2  # mid-way through the third document
    capped = prepare(config(tmp_path / "b", texts, tiny_lm_path, tiny_encoder_path, max_chunks=cap)).corpus
    assert len(capped) == per_doc[0] + per_doc[1] and len(capped.documents()) == 2
    assert (capped.chunks[:] == full.chunks[:len(capped)]).all()
    assert len(RetroSequences(full, full, seq_len=SEQ, pad_id=0, max_seqs=3)) == 3
    with pytest.raises(InputError, match="more than --max-chunks 1 chunks"):
        prepare(config(tmp_path / "c", texts, tiny_lm_path, tiny_encoder_path, max_chunks=1))
    with pytest.raises(UsageError, match="over --max-memory 1000 B"):
        prepare(config(tmp_path / "d", texts, tiny_lm_path, tiny_encoder_path, max_index_memory=1000))
    budget = prepare(config(tmp_path / "e", texts, tiny_lm_path, tiny_encoder_path, index_spec="auto",
                            max_index_memory=1 << 20))
    assert json.loads((tmp_path / "e" / "work" / "manifest.json").read_text())["stages"]["index"]["params"]["max_memory"] == 1 << 20
    assert budget.corpus.neighbours is not None

    from ragkit.archs.retro.training import data_config
    from ragkit.train.config import TrainConfig

    train = TrainConfig(arch="retro", data=str(texts), output="o", workdir="w")
    assert not data_config(train).reprocess
    monkeypatch.setenv("REPROCESS", "1")
    assert data_config(train).reprocess
    result = _cli("train", "--arch", "retro", "--data", texts, "--workdir", tmp_path / "w", "-o", tmp_path / "o",
                  "--max-chunks", "-1")
    assert result.exit_code == 2


def test_filter_thres_is_retro_pytorchs_top_k_fraction(trained: Path) -> None:
    from ragkit.archs.retro.inference import RetroOptions

    assert RetroOptions(filter_thres=0.9, do_sample=True).top_k_for(1000) == max(int((1 - 0.9) * 1000), 1) == 99
    assert RetroOptions(filter_thres=0.5, do_sample=True).top_k_for(1000) == 500
    assert RetroOptions(top_k=7).top_k_for(1000) == 7
    result = _cli("generate", "--arch", "retro", "-m", trained / "run" / "final", "--max-new-tokens", 6,
                  "--do-sample", "--filter-thres", "0.9", "--device", "cpu", input_="the king of\n")
    assert result.exit_code == 0, result.stderr
    for extra, message in ((["--filter-thres", "0.9"], "add --do-sample"),
                           (["--do-sample", "--filter-thres", "0.9", "--top-k", "5"], "give one"),
                           (["--do-sample", "--filter-thres", "1.5"], "fraction in [0, 1)")):
        result = _cli("generate", "--arch", "retro", "-m", trained / "run" / "final", *extra, input_="x\n")
        assert result.exit_code == 2 and message in result.stderr, (extra, result.stderr)


def _retro_pytorch_memmaps(folder: Path, tokenizer, documents: list[str]) -> dict[str, int]:
    """Files in RETRO-pytorch's layout: headerless int32 memmaps, preallocated past what is used, 0-padded."""
    rows, doc_ids, seqs = [], [], []
    for d, text in enumerate(documents):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        count = -(-len(ids) // M)
        padded = ids + [0] * (count * M + 1 - len(ids))
        for c in range(count):
            if c % (SEQ // M) == 0:
                seqs.append(len(rows))
            rows.append(padded[c * M:(c + 1) * M] + [padded[(c + 1) * M]])
            doc_ids.append(d)
    n, s = len(rows), len(seqs)
    chunks = np.zeros((n + 5, M + 1), dtype=np.int32)  # max_chunks > the chunks used, as RETRO-pytorch allocates
    chunks[:n] = rows
    chunks.tofile(folder / "train.chunks.dat")
    np.asarray(doc_ids + [0] * 5, dtype=np.int32).tofile(folder / "train.doc_ids.dat")
    np.asarray(seqs + [0] * 3, dtype=np.int32).tofile(folder / "train.seq.dat")
    knn = np.full((n, 2), -1, dtype=np.int32)
    for i, d in enumerate(doc_ids):
        others = [j for j, e in enumerate(doc_ids) if e != d]
        knn[i, : min(2, len(others))] = others[:2]
    knn.tofile(folder / "train.chunks.knn.dat")
    return {"chunks": n, "seqs": s}


def test_retro_pytorch_memmaps_import_and_train(tmp_path: Path, tiny_lm_path: Path, tiny_encoder_path: Path) -> None:
    """`ragkit retro import` reads RETRO-pytorch's memmaps (padding 0 -> -1, its neighbours kept), and ragkit's
    RETRO trains on the work folder without re-chunking or recomputing the neighbours."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_path)
    rng = random.Random(1)
    documents = [" ".join(rng.choices(WORDS, k=30)) for _ in range(3)]
    stats = _retro_pytorch_memmaps(tmp_path, tok, documents)
    work = tmp_path / "work"
    common = ["--chunks", tmp_path / "train.chunks.dat", "--num-chunks", stats["chunks"], "--num-seqs", stats["seqs"],
              "--chunk-size", M, "--seq-len", SEQ, "--tokenizer", tiny_lm_path, "--embedder", tiny_encoder_path,
              "--device", "cpu"]
    result = _cli("retro", "import", *common, "--workdir", work, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["neighbours"] == 2
    raw = np.fromfile(tmp_path / "train.chunks.dat", dtype=np.int32).reshape(-1, M + 1)[: stats["chunks"]]
    ours = np.load(work / "chunks.npy")
    assert (ours == np.where(raw == 0, P.PAD, raw)).all()
    knn = np.fromfile(tmp_path / "train.chunks.knn.dat", dtype=np.int32).reshape(stats["chunks"], 2)
    assert (np.load(work / "neighbours.npy") == knn).all()
    corpus = RetroCorpus(work, chunk_size=M)
    assert len(corpus.documents()) == 3 and len(corpus.seq_starts) == stats["seqs"]
    assert tok.decode([t for t in ours[: corpus.documents()[0]["chunks"], :M].reshape(-1) if t >= 0]) == documents[0]
    before = (work / "neighbours.npy").read_bytes()
    train = ["train", "--arch", "retro", "--workdir", work, "--tokenizer", tiny_lm_path, "--embedder", tiny_encoder_path,
             "--chunk-size", M, "--seq-len", SEQ, *TINY_MODEL, "--max-steps", 2, "--batch-size", 2, "--device", "cpu"]
    result = _cli(*train, "--data", work, "-o", tmp_path / "run", "--num-neighbors", 2)
    assert result.exit_code == 0, result.stderr
    assert (work / "neighbours.npy").read_bytes() == before  # RETRO-pytorch's neighbours, not recomputed
    for extra, message in ((["--data", work, "--num-neighbors", 3], "holds 2 neighbours"),
                           (["--data", tmp_path, "--num-neighbors", 2], "is its own data"),
                           (["--data", work, "--num-neighbors", 2, "--reprocess"], "import them again")):
        result = _cli(*train, *extra, "-o", tmp_path / "r")
        assert result.exit_code == 2 and message in result.stderr, (extra, result.stderr)
    too_many = _cli("retro", "import", *[str(c) if c != stats["chunks"] else str(stats["chunks"] + 100) for c in common],
                    "--workdir", tmp_path / "w2")
    assert too_many.exit_code == 3 and "train.chunks.dat" in too_many.stderr
