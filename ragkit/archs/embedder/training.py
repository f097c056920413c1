"""Contrastive fine-tuning of the retriever's encoder (`--arch embedder`) on the one trainer.

The model is a sentence-transformers model and the loss is sentence-transformers' own
MultipleNegativesRankingLoss (in-batch negatives + optional hard negatives), or its cached variant
(GradCache: large effective batches in small memory, `--loss cached-mnrl --mini-batch-size N`). Data:
JSONL {query, positive, negative?/negatives?} or a BEIR folder (queries.jsonl, corpus.jsonl,
qrels/train.tsv). `--loss cosine` (CosineSimilarityLoss) trains on scored pairs instead, the format of
sentence-transformers' STS data and seed 002: JSONL {sentence1, sentence2, score} (score in [-1, 1]; the
spellings query/positive and label are read too). Hard negatives are mined from a ragkit index before training (`--index DIR
--hard-negatives N`): the index's top hits for the query with every positive removed.

    CHECKPOINT/embedder/      a sentence-transformers folder (SentenceTransformer(path) opens it)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ragkit.errors import InputError, Location, ResourceError, UsageError
from ragkit.io.jsonl import read_jsonl
from ragkit.io.qrels import read_qrels
from ragkit.train.config import TrainConfig
from ragkit.train.trainer import ListDataset

LOSSES = ("mnrl", "cached-mnrl", "cosine", "margin-mse")
SCORE_FIELDS = ("score", "label", "similarity")


@dataclass
class TrainingPair:
    query: str
    positive: str
    positive_ids: set[str] = field(default_factory=set)  # every relevant doc id of the query (never a negative)
    negatives: list[str] = field(default_factory=list)
    score: float | None = None  # --loss cosine: the pair's target cosine similarity
    teacher: list[float] | None = None  # --distill-from: the teacher's scores of (query, positive), (query, negative j)


def _first(obj: dict[str, Any], names: tuple[str, ...]) -> tuple[str, Any]:
    name = next((n for n in names if n in obj), names[0])
    return name, obj.get(name)


def read_scored_pairs(path: str | Path) -> list[TrainingPair]:
    """{sentence1, sentence2, score} rows (or query/positive and label) for --loss cosine."""
    p = Path(path)
    if not p.is_file():
        raise ResourceError(f"{p}: no such file (--loss cosine reads JSONL pairs with a score)")
    pairs = []
    for lineno, obj in read_jsonl(p):
        texts = []
        for names in (("sentence1", "text1", "query", "anchor"), ("sentence2", "text2", "positive", "pos")):
            name, text = _first(obj, names)
            if not isinstance(text, str) or not text.strip():
                raise InputError(Location(str(p), lineno, name), f"field '{name}' is missing or empty")
            texts.append(text)
        name, score = _first(obj, SCORE_FIELDS)
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not -1.0 <= float(score) <= 1.0:
            raise InputError(Location(str(p), lineno, name),
                             f"field '{name}' must be a number in [-1, 1] (the pair's target cosine similarity)")
        pairs.append(TrainingPair(texts[0], texts[1], score=float(score)))
    if not pairs:
        raise InputError(Location(str(p)), "empty input: no scored pairs")
    return pairs


def read_training_pairs(path: str | Path, split: str = "train") -> list[TrainingPair]:
    p = Path(path)
    if p.is_dir():
        return _read_beir_pairs(p, split)
    if not p.is_file():
        raise ResourceError(f"{p}: no such file or folder")
    pairs = []
    for lineno, obj in read_jsonl(p):
        scored = next((n for n in SCORE_FIELDS if n in obj), None)
        if scored is not None:  # a similarity label would be silently dropped by the ranking losses
            raise InputError(Location(str(p), lineno, scored),
                             f"field '{scored}' is a pair's similarity: train scored pairs with --loss cosine")
        query = obj.get("query", obj.get("question", obj.get("anchor")))
        positive = obj.get("positive", obj.get("pos"))
        if isinstance(positive, list):
            positive = positive[0] if positive else None
        if not isinstance(query, str) or not query.strip():
            raise InputError(Location(str(p), lineno, "query"), "field 'query' is missing or empty")
        if not isinstance(positive, str) or not positive.strip():
            raise InputError(Location(str(p), lineno, "positive"), "field 'positive' is missing or empty")
        # 'negatives' is a list of texts, 'negative' one text (sentence-transformers' triplet column): a
        # string under 'negatives' (one text, or a typo) was taken as a list of one
        if "negatives" in obj:
            negatives = obj["negatives"]
            if not isinstance(negatives, list) or not all(isinstance(n, str) and n.strip() for n in negatives):
                raise InputError(Location(str(p), lineno, "negatives"), "field 'negatives' must be a list of texts")
        else:
            negative = obj.get("negative")
            if negative is not None and not (isinstance(negative, str) and negative.strip()):
                raise InputError(Location(str(p), lineno, "negative"), "field 'negative' must be a text")
            negatives = [] if negative is None else [negative]
        ids = obj.get("positive_id")
        pairs.append(TrainingPair(query, positive, {str(ids)} if ids is not None else set(), list(negatives)))
    if not pairs:
        raise InputError(Location(str(p)), "empty input: no training pairs")
    return pairs


def _read_beir_pairs(folder: Path, split: str) -> list[TrainingPair]:
    qrels_path, queries_path, corpus_path = folder / "qrels" / f"{split}.tsv", folder / "queries.jsonl", folder / "corpus.jsonl"
    for f in (qrels_path, queries_path, corpus_path):
        if not f.exists():
            raise ResourceError(f"{f}: missing (a BEIR folder has corpus.jsonl, queries.jsonl and qrels/{split}.tsv)")
    relevant = {q: [d for d, score in docs.items() if score > 0] for q, docs in read_qrels(qrels_path).items()}
    relevant = {q: docs for q, docs in relevant.items() if docs}
    queries = {str(o.get("_id")): o.get("text", "") for _, o in read_jsonl(queries_path)}
    wanted = {d for docs in relevant.values() for d in docs}
    docs = {}
    for _, o in read_jsonl(corpus_path):
        if str(o.get("_id")) in wanted:
            docs[str(o["_id"])] = f"{o.get('title') or ''} {o.get('text') or ''}".strip()
    pairs = []
    for qid, doc_ids in relevant.items():
        if qid not in queries:
            raise InputError(Location(str(queries_path)), f"query '{qid}' of {qrels_path.name} has no text")
        for d in doc_ids:
            if d not in docs:
                raise InputError(Location(str(corpus_path)), f"document '{d}' of {qrels_path.name} is not in the corpus")
            pairs.append(TrainingPair(queries[qid], docs[d], set(doc_ids)))
    if not pairs:
        raise InputError(Location(str(qrels_path)), "empty input: no positive qrels")
    return pairs


def mine_hard_negatives(pairs: list[TrainingPair], retriever: Any, n: int, *, depth: int = 30) -> int:
    """Add up to n hard negatives per pair: the index's top hits, positives (by id and by text) removed."""
    if n <= 0:
        return 0
    added = 0
    hits = retriever.retrieve([p.query for p in pairs], depth)
    for pair, row in zip(pairs, hits):
        positives_text = {pair.positive.strip()}
        for h in row:
            if len(pair.negatives) >= n:
                break
            text = f"{h.title} {h.text}".strip()
            if h.id in pair.positive_ids or text in positives_text or h.text.strip() in positives_text:
                continue
            pair.negatives.append(text)
            added += 1
    return added


class EmbedderForTraining(torch.nn.Module):
    """forward(features) -> {"loss", "tokens"}: the sentence-transformers loss over tokenised columns."""

    def __init__(self, model: Any, loss: Any) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, features: list[dict[str, torch.Tensor]], labels: torch.Tensor | None = None) -> dict[str, Any]:
        device = next(self.model.parameters()).device
        features = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in f.items()} for f in features]
        value = self.loss(features, labels.to(device) if labels is not None else None)
        return {"loss": value, "tokens": int(sum(f["attention_mask"].sum() for f in features))}


class EmbedderArch:
    def __init__(self) -> None:
        self.model: Any = None
        self.negatives = 0

    def build(self, config: TrainConfig, device: str) -> EmbedderForTraining:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers import losses as st_losses

        from ragkit.models.dpr import embedder_location
        from ragkit.models.registry import missing_model_error, quiet_transformers, resolve

        loss_name = config.loss or ("margin-mse" if config.distill_from else "mnrl")
        if loss_name not in LOSSES:
            raise UsageError(f"--loss {config.loss}: expected one of {', '.join(LOSSES)} for --arch embedder")
        if (loss_name == "margin-mse") != bool(config.distill_from):
            raise UsageError("--distill-from trains with MarginMSE (--loss margin-mse), which needs a --distill-from "
                             "teacher" if config.distill_from else "--loss margin-mse learns a teacher's margins: "
                             "give --distill-from TEACHER")
        name = config.embedder or _index_embedder(config.index) or "minilm"
        ref = resolve(name)
        quiet_transformers()
        try:
            model = SentenceTransformer(embedder_location(ref), device=device)
        except (OSError, ValueError) as exc:
            raise missing_model_error(ref, exc) from exc
        if loss_name == "cosine":
            loss = st_losses.CosineSimilarityLoss(model)
        elif loss_name == "margin-mse":  # Hofstätter et al. (2020): the student's score margins regress the teacher's
            loss = st_losses.MarginMSELoss(model)
        elif loss_name == "cached-mnrl":
            loss = st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=config.mini_batch_size,
                                                                show_progress_bar=False)
        else:
            loss = st_losses.MultipleNegativesRankingLoss(model)
        self.model = model
        return EmbedderForTraining(model, loss)

    def dataset(self, config: TrainConfig) -> ListDataset:
        if config.loss == "cosine":
            if config.hard_negatives > 0:
                raise UsageError("--hard-negatives: --loss cosine trains on scored pairs, it has no negatives")
            return ListDataset(read_scored_pairs(config.data))
        pairs = read_training_pairs(config.data)
        if config.hard_negatives > 0:
            if not config.index:
                raise UsageError("--hard-negatives needs --index DIR to mine them from")
            from ragkit.retrieval import Retriever

            self.negatives = mine_hard_negatives(pairs, Retriever(config.index), config.hard_negatives)
        # every row needs the same number of columns: pairs short of negatives repeat their last one (the
        # data's own negatives count as well as mined ones; they were dropped unless --hard-negatives was set)
        width = max(len(p.negatives) for p in pairs)
        for p in pairs:
            p.negatives = (p.negatives + [p.negatives[-1]] * width)[:width] if p.negatives else []
        if width and any(not p.negatives for p in pairs):
            from ragkit.console import info

            kept = [p for p in pairs if p.negatives]
            info(f"warning: {len(pairs) - len(kept)} of {len(pairs)} pairs have no negative and are left out "
                 "(every row of a batch needs the same columns)")
            pairs = kept
        if config.distill_from:
            if not any(p.negatives for p in pairs):
                raise UsageError("--distill-from learns the teacher's margins between a positive and negatives: give "
                                 "negatives in the data, or mine them with --index DIR --hard-negatives N")
            width = min(len(p.negatives) for p in pairs)
            for p in pairs:
                p.negatives = p.negatives[:width]
            score_with_teacher(pairs, config.distill_from, device=config.device)
        return ListDataset(pairs)

    def collate(self, rows: list[TrainingPair]) -> dict[str, Any]:
        columns = [[r.query for r in rows], [r.positive for r in rows]]
        for j in range(len(rows[0].negatives)):
            columns.append([r.negatives[j] for r in rows])
        # sentence-transformers >= 6 names it `preprocess` (tokenize is deprecated); 5.x has only tokenize
        prepare = getattr(self.model, "preprocess", None) or self.model.tokenize
        batch: dict[str, Any] = {"features": [prepare(texts) for texts in columns]}
        if rows[0].score is not None:
            batch["labels"] = torch.tensor([r.score for r in rows], dtype=torch.float32)
        elif rows[0].teacher is not None:
            batch["labels"] = torch.tensor([r.teacher for r in rows], dtype=torch.float32)  # (B, 1 + negatives)
        return batch

    def save(self, model: EmbedderForTraining, directory: Path) -> None:
        model.model.save(str(directory / "embedder"))

    def load(self, model: EmbedderForTraining, directory: Path) -> None:
        from safetensors.torch import load_file

        weights = directory / "embedder" / "model.safetensors"
        if not weights.exists():
            raise ResourceError(f"{directory}: no embedder weights to resume from")
        model.model[0].auto_model.load_state_dict(load_file(weights))


def score_with_teacher(pairs: list[TrainingPair], teacher: str, *, device: str = "auto", batch: int = 64) -> str:
    """Each pair's teacher scores [s(q, positive), s(q, negative_1), ...], once before training: a cross-encoder
    (a sequence-classification model) scores each (query, passage) pair; an embedder scores by its own
    similarity of the two embeddings. Returns which kind the teacher was."""
    from transformers import AutoConfig

    from ragkit.models.encoder import resolve_device
    from ragkit.models.registry import materialize, missing_model_error, quiet_transformers, resolve

    ref = resolve(teacher)
    quiet_transformers()
    device = resolve_device(device)
    try:
        location = materialize(ref)
        architectures = getattr(AutoConfig.from_pretrained(location), "architectures", None) or []
        if any(a.endswith("ForSequenceClassification") for a in architectures):
            from sentence_transformers import CrossEncoder

            model = CrossEncoder(location, device=device)
            texts = [(p.query, doc) for p in pairs for doc in (p.positive, *p.negatives)]
            flat = [float(x) for x in model.predict(texts, batch_size=batch, show_progress_bar=False)]
            kind = "cross-encoder"
        else:
            from sentence_transformers import SentenceTransformer

            from ragkit.models.dpr import embedder_location

            model = SentenceTransformer(embedder_location(ref), device=device)
            queries = model.encode([p.query for p in pairs], batch_size=batch, convert_to_tensor=True)
            docs = model.encode([d for p in pairs for d in (p.positive, *p.negatives)], batch_size=batch,
                                convert_to_tensor=True)
            per = 1 + len(pairs[0].negatives)
            docs = docs.reshape(len(pairs), per, -1)
            flat = [float(x) for q, d in zip(queries, docs) for x in model.similarity(q[None], d)[0]]
            kind = "embedder"
    except (OSError, ValueError) as exc:
        raise missing_model_error(ref, exc) from exc
    per = 1 + len(pairs[0].negatives)
    for i, pair in enumerate(pairs):
        pair.teacher = flat[i * per:(i + 1) * per]
    return kind


def _index_embedder(index: str) -> str | None:
    if not index:
        return None
    from ragkit.index import Index

    return Index.open(index.split(",")[0]).encoder.name
