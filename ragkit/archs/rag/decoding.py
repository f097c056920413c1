"""Decoding a trained RAG model: RAG-Token greedy, RAG-Sequence "thorough" and "fast" (Lewis et al., 2020).

- token: at every step the next-token distribution is the mixture over the K passages weighted by
  p(z|x); greedy over that mixture, with one KV cache row per passage (causal generators).
- token-beam: beam search over that same per-token mixture (`num_beams` hypotheses; finished ones ranked
  by log-probability / length, as transformers' default length penalty 1.0).
- sequence-thorough: each passage proposes an answer (greedy); every distinct candidate is re-scored
  under all K passages, log p(y|x) = logsumexp_k [log p(z_k|x) + log p(y|x, z_k)], and the best wins.
- sequence-fast: candidates are scored only under the passages that proposed them (the others count as
  probability 0), which skips the re-scoring passes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ragkit.errors import ResourceError, UsageError
from ragkit.archs.rag.inference import MODES, is_rag_checkpoint
from ragkit.archs.rag.model import RagForTraining, RagModelConfig, decoder_prefix
from ragkit.archs.rag.losses import rag_sequence_loss


@dataclass(frozen=True)
class RagDecodingConfig:
    mode: str = "sequence-thorough"
    num_beams: int = 4  # token-beam only


@dataclass
class RagAnswer:
    text: str
    hits: list[Any]
    doc_probs: list[float]
    log_prob: float


def load_rag_checkpoint(path: str | Path, *, device: str = "cpu", index: str | None = None,
                        quantize: str = "none") -> RagForTraining:
    """A trained checkpoint for inference, its generator loaded under --quantize (a LoRA adapter merged or
    kept on top as ready_for_inference decides)."""
    from sentence_transformers import SentenceTransformer

    from ragkit.index import Index
    from ragkit.models.lm import load_lm

    root = Path(path)
    if not is_rag_checkpoint(root):
        raise ResourceError(f"{root}: not a ragkit RAG checkpoint (no rag_config.json)")
    fields = json.loads((root / "rag_config.json").read_text())
    config = RagModelConfig(**fields)
    if index:
        config.index = index
    query_encoder = SentenceTransformer(str(root / "query_encoder"), device=device)
    # trained in float32; a LoRA adapter goes on the base it was trained over
    loaded = load_lm(root / "generator", device=device, dtype="auto" if quantize in ("4bit", "8bit") else "float32",
                     quantize=quantize, base=config.generator)
    model, tokenizer, is_seq2seq = loaded.model, loaded.tokenizer, loaded.is_seq2seq
    renderer = _Renderer(tokenizer)
    rag = RagForTraining(config, query_encoder, model, tokenizer, Index.open(config.index), render=renderer,
                         is_seq2seq=is_seq2seq)
    return rag.eval()


class _Renderer:
    """The same chat-template rendering the generator used in training."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, message: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                                      add_generation_prompt=True)
        return message


@torch.no_grad()
def decode(rag: RagForTraining, questions: list[str], *, mode: str = "sequence-thorough",
           max_new_tokens: int = 32, num_beams: int = 4) -> list[RagAnswer]:
    if mode not in MODES:
        raise UsageError(f"--rag-decoding {mode}: expected one of {', '.join(MODES)}")
    hits, doc_scores = rag.retrieve(questions)
    prior = torch.log_softmax(doc_scores.float(), dim=1)
    out = []
    for i, question in enumerate(questions):
        prompts = rag._prompts([question], [hits[i]])
        if mode == "token":
            text, log_prob = _token_greedy(rag, prompts, prior[i], max_new_tokens)
        elif mode == "token-beam":
            text, log_prob = _token_beam(rag, prompts, prior[i], max_new_tokens, num_beams)
        else:
            text, log_prob = _sequence(rag, question, hits[i], doc_scores[i : i + 1], prompts, prior[i],
                                       max_new_tokens, thorough=mode == "sequence-thorough")
        out.append(RagAnswer(text, hits[i], prior[i].exp().tolist(), log_prob))
    return out


def _token_greedy(rag: RagForTraining, prompts: list[str], prior: torch.Tensor, max_new: int) -> tuple[str, float]:
    tok, model = rag.tokenizer, rag.generator
    eos = tok.eos_token_id
    chosen: list[int] = []
    total = 0.0
    if rag.is_seq2seq:
        enc = rag.encoder_inputs(prompts)
        start = decoder_prefix(model)
        for _ in range(max_new - (len(start) - 1)):
            dec = torch.tensor([[*start, *chosen]] * len(prompts), device=enc["input_ids"].device)
            logits = model(**enc, decoder_input_ids=dec).logits[:, -1]
            token, lp = _mix(logits, prior)
            if token == eos:
                break
            chosen.append(token)
            total += lp
        return tok.decode(chosen, skip_special_tokens=True).strip(), total
    input_ids, mask = rag.left_padded(prompts)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    past = None
    step_ids, step_pos = input_ids, positions
    for _ in range(max_new):
        outputs = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=past, use_cache=True)
        past = outputs.past_key_values
        token, lp = _mix(outputs.logits[:, -1], prior)
        if token == eos:
            break
        chosen.append(token)
        total += lp
        step_ids = torch.full((len(prompts), 1), token, device=input_ids.device)
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
    return tok.decode(chosen, skip_special_tokens=True).strip(), total


def _token_beam(rag: RagForTraining, prompts: list[str], prior: torch.Tensor, max_new: int,
                num_beams: int) -> tuple[str, float]:
    """Beam search over the RAG-Token mixture. Each step runs every (beam, passage) pair in one batch without
    a cache: answers are short, and the batch is beams x passages rows."""
    tok, model = rag.tokenizer, rag.generator
    eos = tok.eos_token_id
    device = next(model.parameters()).device
    k = len(prompts)
    prior = prior.to(device)
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[list[int], float]] = []
    if rag.is_seq2seq:
        enc = rag.encoder_inputs(prompts)
        start = decoder_prefix(model)
    else:
        input_ids, mask = rag.left_padded(prompts)
    for _ in range(max_new):
        if not beams:
            break
        n = len(beams)
        if rag.is_seq2seq:
            dec = torch.tensor([[*start, *ys] for ys, _ in beams for _ in range(k)], device=device)
            logits = model(input_ids=enc["input_ids"].repeat(n, 1), attention_mask=enc["attention_mask"].repeat(n, 1),
                           decoder_input_ids=dec).logits[:, -1]
        else:
            grown = torch.tensor([ys for ys, _ in beams for _ in range(k)], dtype=torch.long, device=device)
            ids = torch.cat([input_ids.repeat(n, 1), grown.reshape(n * k, -1)], dim=1)
            att = torch.cat([mask.repeat(n, 1), torch.ones_like(grown.reshape(n * k, -1))], dim=1)
            positions = (att.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=att, position_ids=positions).logits[:, -1]
        lp = torch.log_softmax(logits.float(), dim=-1).reshape(n, k, -1)
        marginal = (lp + prior[None, :, None]).logsumexp(1)  # n, V
        scores = marginal + torch.tensor([score for _, score in beams], device=device)[:, None]
        top = scores.reshape(-1).topk(min(2 * num_beams, scores.numel()))
        vocab = scores.shape[1]
        next_beams: list[tuple[list[int], float]] = []
        for value, flat in zip(top.values.tolist(), top.indices.tolist()):
            ys, token = beams[flat // vocab][0], flat % vocab
            if token == eos:
                finished.append((ys, value))
            else:
                next_beams.append((ys + [token], value))
            if len(next_beams) == num_beams:
                break
        beams = next_beams
        if len(finished) >= num_beams and beams and max(f[1] / max(len(f[0]), 1) for f in finished) >= max(
                b[1] / len(b[0]) for b in beams):
            break  # no open beam can still beat the best finished one at its current normalised score
    finished += beams
    best = max(finished, key=lambda f: f[1] / max(len(f[0]), 1))
    return tok.decode(best[0], skip_special_tokens=True).strip(), best[1]


def _mix(logits: torch.Tensor, prior: torch.Tensor) -> tuple[int, float]:
    """Greedy token of the mixture Σ_k p(z_k|x) p(y|x, z_k, y<t)."""
    marginal = (torch.log_softmax(logits.float(), dim=-1) + prior.to(logits.device)[:, None]).logsumexp(0)
    token = int(marginal.argmax())
    return token, float(marginal[token])


def _sequence(rag: RagForTraining, question: str, hits: list[Any], doc_scores: torch.Tensor, prompts: list[str],
              prior: torch.Tensor, max_new: int, *, thorough: bool) -> tuple[str, float]:
    tok, model = rag.tokenizer, rag.generator
    if rag.is_seq2seq:
        enc = rag.encoder_inputs(prompts)
        generated = model.generate(**enc, max_new_tokens=max_new, do_sample=False)
        texts = tok.batch_decode(generated, skip_special_tokens=True)
    else:
        input_ids, mask = rag.left_padded(prompts)
        generated = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                   pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(generated[:, input_ids.shape[1]:], skip_special_tokens=True)
    proposals: dict[str, list[int]] = {}
    for k, text in enumerate(texts):
        proposals.setdefault(text.strip(), []).append(k)
    best, best_lp = "", float("-inf")
    for candidate, proposers in proposals.items():
        if not candidate:
            continue
        target = rag._targets([candidate])
        if thorough:  # the candidate under every passage: the exact RAG-Sequence marginal
            logits = rag.answer_logits(prompts, target)
            score = -float(rag_sequence_loss(logits, doc_scores.to(logits.device), target.to(logits.device),
                                             pad_id=-100, reduce=True).nll)
        else:  # only under the passages that proposed it
            logits = rag.answer_logits([prompts[k] for k in proposers], target)
            lp_doc = _per_doc_logprob(logits, target)
            score = float((lp_doc + prior[proposers].to(lp_doc.device)).logsumexp(0))
        if score > best_lp:
            best, best_lp = candidate, score
    return best, best_lp


def _per_doc_logprob(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    target = target.to(logits.device)
    lp = torch.log_softmax(logits.float(), dim=-1)
    k = logits.shape[0]
    labels = target.expand(k, -1)
    mask = labels.ne(-100)
    token_lp = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)
    return token_lp.sum(-1)
