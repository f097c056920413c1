"""RAG for training: a trainable query encoder over a fixed ragkit index, and any HF generator.

The retriever searches the index with the current query embeddings (no gradient), then the doc scores
are recomputed as q·d with the stored document vectors so that the marginal likelihood trains the
query encoder (Lewis et al., 2020). Generators: causal LMs read "passage + question" as a prompt and
are scored on the answer span; seq2seq models read it as the encoder input.
"""

from __future__ import annotations

import time

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ragkit.errors import ResourceError, UsageError
from ragkit.index import Index
from ragkit.archs.rag.losses import rag_sequence_loss, rag_token_loss
from ragkit.archs.reader.answer import RAG_PROMPT, format_passages
from ragkit.models.lm import LoraSettings

IGNORE = -100
LOSSES = ("sequence", "token")
PROMPTS = ("ragkit", "hf-rag")


@dataclass
class RagModelConfig:
    """What defines a RAG model besides its weights; saved beside every checkpoint."""

    generator: str = "smollm2-135m"  # hub id, folder, .gguf or alias
    query_encoder: str | None = None  # default: the embedder that built the index
    index: str = ""  # the ragkit index (kept fixed)
    n_docs: int = 5  # passages marginalised over
    loss: str = "sequence"  # sequence (RAG-Sequence) or token (RAG-Token)
    label_smoothing: float = 0.0
    max_source_tokens: int = 384  # prompt (passage + question) tokens, cut from the left of the passage
    max_target_tokens: int = 32
    max_passage_words: int = 100
    train_query_encoder: bool = True
    end2end: bool = False  # also train a document encoder; doc scores use its embeddings of the hits
    dropout: float | None = None  # the generator's own dropout fields, set before its layers are built
    attention_dropout: float | None = None
    # how a passage and the question become the generator's input: "ragkit" (RAG_PROMPT, chat template) or
    # "hf-rag", transformers' RAG format `title / text // question` (a checkpoint imported from or exported to
    # RagSequenceForGeneration / RagTokenForGeneration; title_sep and doc_sep are its separators)
    prompt: str = "ragkit"
    title_sep: str = " / "
    doc_sep: str = " // "
    extra: dict[str, Any] = field(default_factory=dict)


def decoder_prefix(model: Any) -> list[int]:
    """What a seq2seq generator's decoder starts from: its decoder start token, then the token its generation
    config forces first (BART's forced_bos_token_id), as transformers' generate (and RAG's) does."""
    generation = getattr(model, "generation_config", None)
    start = getattr(generation, "decoder_start_token_id", None)
    if start is None:
        start = model.config.decoder_start_token_id
    forced = getattr(generation, "forced_bos_token_id", None)
    return [start] + ([forced] if forced is not None else [])


def _embed(encoder: Any, texts: list[str]) -> torch.Tensor:
    """Sentence embeddings with gradient (SentenceTransformer.encode would run without it)."""
    # sentence-transformers >= 6 renamed tokenize to preprocess
    features = (getattr(encoder, "preprocess", None) or encoder.tokenize)(texts)
    device = next(encoder.parameters()).device
    features = {k: v.to(device) if torch.is_tensor(v) else v for k, v in features.items()}
    return encoder(features)["sentence_embedding"]


class RagForTraining(nn.Module):
    """forward(questions, answers) -> {"loss", "nll", "doc_scores"}; the trainer only calls this."""

    def __init__(self, config: RagModelConfig, query_encoder: Any, generator: Any, tokenizer: Any, index: Index,
                 *, render: Any, is_seq2seq: bool, searcher: Any = None, doc_encoder: Any = None) -> None:
        super().__init__()
        if config.loss not in LOSSES:
            raise UsageError(f"--loss {config.loss}: expected one of {', '.join(LOSSES)}")
        if config.n_docs < 1:
            raise UsageError("--n-docs must be at least 1")
        if config.prompt not in PROMPTS:
            raise UsageError(f"RAG prompt {config.prompt!r}: expected one of {', '.join(PROMPTS)}")
        self.config = config
        self.query_encoder = query_encoder
        self.generator = generator
        self.tokenizer = tokenizer
        self.index = index
        # what answers searches: the index itself, or Ray actors serving it (same results)
        self.searcher = searcher if searcher is not None else index
        self.retrieval_s = 0.0  # seconds spent retrieving (search + end-to-end re-encoding), cumulative
        self.teacher: list[Any] = []  # --distill-from: a frozen generator of the same vocabulary (a list: not a submodule)
        self.distill_alpha, self.distill_temperature = 1.0, 1.0
        self.render = render
        self.is_seq2seq = is_seq2seq
        for p in self.query_encoder.parameters():
            p.requires_grad_(config.train_query_encoder)
        if config.end2end and doc_encoder is None:
            raise UsageError("end-to-end training needs a document encoder")
        self.doc_encoder = doc_encoder

    @property
    def _no_split_modules(self) -> list[str]:
        """Layer classes FSDP wraps one by one (its transformer wrap policy reads this attribute): the
        generator's decoder/encoder layers and the encoders' transformer layers."""
        names: list[str] = []
        parts = [self.generator, self.query_encoder, self.doc_encoder]
        for part in parts:
            for module in part.modules() if part is not None else ():
                for name in getattr(module, "_no_split_modules", None) or ():
                    if name not in names:
                        names.append(name)
        return names

    # -- retrieval ---------------------------------------------------------------------------------
    def embed_questions(self, questions: list[str]) -> torch.Tensor:
        return _embed(self.query_encoder, questions)

    def retrieve(self, questions: list[str]) -> tuple[list[list[Any]], torch.Tensor]:
        """Top-n_docs hits and their doc scores q·d, differentiable in the query encoder (and, end to end,
        in the document encoder, which re-embeds the hits instead of reading their stored vectors)."""
        q = self.embed_questions(questions)
        began = time.perf_counter()
        hits, doc_vectors = self.searcher.search_with_vectors(q.detach().float().cpu().numpy(), self.config.n_docs)
        if self.doc_encoder is not None:
            texts = [f"{h.title} {h.text}" if h.title else h.text for row in hits for h in row]
            d = _embed(self.doc_encoder, texts).reshape(len(hits), self.config.n_docs, -1).to(q.dtype)
            if self.index.encoder.normalize:  # as the stored vectors were
                d = torch.nn.functional.normalize(d, dim=-1)
        else:
            d = torch.from_numpy(np.array(doc_vectors, dtype=np.float32)).to(q.device, q.dtype)  # Ray arrays are read-only
        self.retrieval_s += time.perf_counter() - began  # read by the trainer under --profile
        return hits, torch.einsum("bd,bkd->bk", q, d)

    # -- generator inputs --------------------------------------------------------------------------
    def _prompts(self, questions: list[str], hits: list[list[Any]]) -> list[str]:
        if self.config.prompt == "hf-rag":
            return self._hf_rag_prompts(questions, hits)
        out = []
        for question, row in zip(questions, hits):
            for hit in row:
                passage = format_passages([{"title": hit.title, "text": hit.text}], self.config.max_passage_words)
                out.append(self.render(RAG_PROMPT.format(question=question, passages=passage)))
        return out

    def _hf_rag_prompts(self, questions: list[str], hits: list[list[Any]]) -> list[str]:
        """As transformers' RagRetriever.postprocess_docs joins them: the generator's prefix, the title without
        its surrounding quotes, title_sep, the whole passage, doc_sep, the question; double spaces made single."""
        prefix = getattr(self.generator.config, "prefix", None) or ""
        c = self.config
        return [(prefix + hit.title.removeprefix('"').removesuffix('"') + c.title_sep + hit.text + c.doc_sep
                 + question).replace("  ", " ") for question, row in zip(questions, hits) for hit in row]

    def _targets(self, answers: list[str]) -> torch.Tensor:
        tok = self.tokenizer
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        # a seq2seq decoder that generation starts with a forced token (BART's <s>) learns it first, so that
        # training, decoding and re-scoring see the same decoder inputs
        lead = decoder_prefix(self.generator)[1:] if self.is_seq2seq else []
        room = self.config.max_target_tokens - len(eos) - len(lead)
        rows = [lead + tok(a, add_special_tokens=False)["input_ids"][:room] + eos for a in answers]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [IGNORE] * (width - len(r)) for r in rows])

    def encoder_inputs(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """A seq2seq generator's encoder inputs (ids and mask only: a BERT-style tokenizer's token_type_ids
        are no input of BART or T5, and generate() refuses them)."""
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, truncation=True,
                             max_length=self.config.max_source_tokens)
        device = next(self.generator.parameters()).device
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}

    def left_padded(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal prompts (kept to their last max_source_tokens) left-padded: (input_ids, attention_mask)."""
        tok = self.tokenizer
        ids = [x[-self.config.max_source_tokens:] for x in tok(prompts, add_special_tokens=False)["input_ids"]]
        width = max(len(x) for x in ids)
        device = next(self.generator.parameters()).device
        input_ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        return input_ids, mask

    def answer_logits(self, prompts: list[str], target: torch.Tensor) -> torch.Tensor:
        """Logits aligned with `target`, each row repeated for its K prompts: shape (B*K, T, V)."""
        return self._answer_logits(prompts, target)[0]

    def _answer_logits(self, prompts: list[str], target: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The logits, and how many (non-pad) tokens the generator read to produce them."""
        inputs, span, read = self._answer_inputs(prompts, target)
        return self._run_answer(self.generator, inputs, span), read

    def _answer_inputs(self, prompts: list[str], target: torch.Tensor) -> tuple[dict[str, Any], int, int]:
        """The generator's keyword inputs for (prompt, answer) rows, the answer span, and the tokens read."""
        tok, k = self.tokenizer, len(prompts) // target.shape[0]
        device = next(self.generator.parameters()).device
        labels = target.repeat_interleave(k, dim=0).to(device)
        span = target.shape[1]
        if self.is_seq2seq:
            enc = self.encoder_inputs(prompts)
            dec_labels = labels.masked_fill(labels.eq(IGNORE), tok.pad_token_id)
            decoder_input_ids = self.generator.prepare_decoder_input_ids_from_labels(labels=dec_labels)
            read = int(enc["attention_mask"].sum()) + int(labels.ne(IGNORE).sum())
            return {**enc, "decoder_input_ids": decoder_input_ids}, 0, read
        # causal: [left pad | prompt | answer | right pad]; the answer span starts at the same column in
        # every row, so logits[:, P-1+t] predicts answer token t for all passages alike.
        left, left_mask = self.left_padded(prompts)
        answer = labels.masked_fill(labels.eq(IGNORE), tok.pad_token_id)
        input_ids = torch.cat([left, answer], dim=1)
        attention = torch.cat([left_mask, labels.ne(IGNORE).long()], dim=1)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": input_ids, "attention_mask": attention, "position_ids": positions}, span, int(attention.sum())

    @staticmethod
    def _run_answer(model: Any, inputs: dict[str, Any], span: int) -> torch.Tensor:
        """`model`'s logits over the answer span (seq2seq: the decoder's; causal: only the span's positions,
        since full-sequence logits over a 50k vocabulary dominate memory)."""
        if not span:
            return model(**inputs).logits
        return model(**inputs, logits_to_keep=span + 1).logits[:, :span]

    def forward(self, questions: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
        if len(questions) != len(answers) or not questions:
            raise UsageError("a RAG batch needs one answer per question")
        hits, doc_scores = self.retrieve(questions)
        target = self._targets(answers)
        inputs, span, read = self._answer_inputs(self._prompts(questions, hits), target)
        logits = self._run_answer(self.generator, inputs, span)
        fn = rag_sequence_loss if self.config.loss == "sequence" else rag_token_loss
        out = fn(logits, doc_scores.to(logits.device), target.to(logits.device), pad_id=IGNORE,
                 epsilon=self.config.label_smoothing, reduce=True)
        n = len(questions)
        loss = out.loss / n
        result = {"nll": out.nll.detach() / n, "doc_scores": doc_scores.detach(), "tokens": read}
        if self.teacher:
            with torch.no_grad():
                teacher_logits = self._run_answer(self.teacher[0], inputs, span)
            kd = passage_weighted_kl(logits, teacher_logits, target.to(logits.device), doc_scores.detach(),
                                     self.distill_temperature)
            loss = self.distill_alpha * loss + (1 - self.distill_alpha) * kd
            result["kd"] = kd.detach()
        return {"loss": loss, **result}


def passage_weighted_kl(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, doc_scores: torch.Tensor,
                        temperature: float) -> torch.Tensor:
    """T^2 * sum_z p(z|x) * mean_t KL(softmax(teacher/T) || softmax(student/T)) over each answer's tokens, averaged
    over questions: the student learns the teacher's token distribution in every retrieved passage, each
    passage counted as much as the retriever believes in it (doc posterior p(z|x) = softmax(doc scores))."""
    b, k = doc_scores.shape
    labels = target.repeat_interleave(k, dim=0)
    mask = labels.ne(IGNORE)
    s = torch.log_softmax(student.float() / temperature, dim=-1)
    t = torch.log_softmax(teacher.float() / temperature, dim=-1)
    per_token = (t.exp() * (t - s)).sum(-1) * mask  # (B*K, T)
    per_row = per_token.sum(-1) / mask.sum(-1).clamp(min=1)
    weights = torch.softmax(doc_scores.float(), dim=-1).reshape(-1).to(per_row.device)
    return (weights * per_row).sum() / b * temperature**2


def build_rag(config: RagModelConfig, *, device: str = "cpu", lora: LoraSettings | None = None,
              searcher: Any = None) -> RagForTraining:
    """Load the index, a trainable copy of the query encoder and the generator (optionally with LoRA)."""
    from sentence_transformers import SentenceTransformer

    from ragkit.models.dpr import embedder_location
    from ragkit.models.encoder import embedding_dimension, pool_as, pooled_fingerprint
    from ragkit.models.generator import Generator
    from ragkit.models.registry import missing_model_error, quiet_transformers, resolve

    index = Index.open(config.index.split(",")[0])  # with shards, the first one describes them all
    queries = index.encoder.for_queries()  # the index's query encoder (DPR: the question encoder of the pair)
    name = config.query_encoder or queries.name
    quiet_transformers()

    def private_copy(name: str, pooling: str) -> tuple[Any, str, str]:
        # a private copy: the encoder cache shared with retrieval must never be trained in place
        ref = resolve(name)
        try:
            model = SentenceTransformer(embedder_location(ref), device=device)
        except (OSError, ValueError) as exc:
            raise missing_model_error(ref, exc) from exc
        return pool_as(model, pooling, name)

    # queries pool as the index records (its passages', or its own query encoder's)
    query_encoder, own, used = private_copy(name, queries.pooling or "model")
    dim = embedding_dimension(query_encoder)
    if dim != index.dim:
        raise ResourceError(f"query encoder '{name}' gives dimension {dim}; {config.index} holds dimension {index.dim}",
                            hint="Retrieve from an index embedded by its passage encoder (a DPR pair: the context encoder).")
    refreshed = index.manifest.get("end2end") is not None  # its vectors come from an end-to-end doc encoder
    if config.query_encoder is None and not refreshed and pooled_fingerprint(query_encoder, own, used) != queries.fingerprint:
        raise UsageError(f"{config.index}: its embedder '{name}' no longer matches the index fingerprint")
    doc_encoder = None
    if config.end2end:
        if searcher is not None:
            raise UsageError("--end2end refreshes the index in this process; it does not work with --distributed-retriever ray")
        # starts as the index's passage embedder
        doc_encoder = private_copy(index.encoder.name, index.encoder.pooling or "model")[0]
    quantize = lora.quantize if lora is not None else "none"
    generator = Generator(config.generator, device=device, dtype="float32" if quantize == "none" else "auto",
                          quantize=quantize, dropout=config.dropout, attention_dropout=config.attention_dropout)
    model = generator.model
    if lora is not None:
        from ragkit.models.lm import add_lora

        model = add_lora(model, lora, seq2seq=generator.is_seq2seq)
    return RagForTraining(config, query_encoder, model, generator.tokenizer, index, render=generator.render,
                          is_seq2seq=generator.is_seq2seq, searcher=searcher, doc_encoder=doc_encoder)
