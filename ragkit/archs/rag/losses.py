"""RAG-Sequence and RAG-Token marginal likelihoods (Lewis et al., 2020), as the HF RAG implementation.

Inputs are aligned: `seq_logits[b*K + k, t]` scores `target[b, t]` given passage k of question b
(for a causal generator the caller cuts the answer span out of the full sequence so that this holds).
`doc_scores[b, k]` are the retriever's scores, so the softmax over the top-K passages — and through it
the query encoder — receives gradient.

Hand-written because transformers only ships these inside `RagSequenceForGeneration` /
`RagTokenForGeneration`, tied to a BART/T5 generator and a DPR encoder; ragkit needs them for any
generator. Tests check both against those classes and against brute force.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RagLoss:
    loss: torch.Tensor  # what to minimise: (1-ε)·nll + ε/V·smooth, reduced as asked
    nll: torch.Tensor  # -log p(y|x) per question (or summed)


def _split(seq_logits: torch.Tensor, doc_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, n_docs = doc_scores.shape
    total, length, vocab = seq_logits.shape
    assert total == batch * n_docs, f"seq_logits rows {total} != batch {batch} x n_docs {n_docs}"
    seq_logprobs = F.log_softmax(seq_logits.float(), dim=-1).view(batch, n_docs, length, vocab)
    doc_logprobs = F.log_softmax(doc_scores.float(), dim=1)
    return seq_logprobs, doc_logprobs


def rag_sequence_loss(seq_logits: torch.Tensor, doc_scores: torch.Tensor, target: torch.Tensor, *, pad_id: int,
                      epsilon: float = 0.0, reduce: bool = True) -> RagLoss:
    """log p(y|x) = logsumexp_k [ log p_η(z_k|x) + Σ_t log p_θ(y_t | x, z_k, y<t) ]."""
    seq_logprobs, doc_logprobs = _split(seq_logits, doc_scores)
    batch, n_docs, length, vocab = seq_logprobs.shape
    mask = target.ne(pad_id).unsqueeze(1).expand(batch, n_docs, length)  # (B, K, T)
    index = target.clamp(min=0).unsqueeze(1).unsqueeze(-1).expand(batch, n_docs, length, 1)
    token_ll = seq_logprobs.gather(-1, index).squeeze(-1).masked_fill(~mask, 0.0)
    ll = (token_ll.sum(-1) + doc_logprobs).logsumexp(1)  # (B,)
    # Smoothing term as HF computes it: the doc log-prob is added to every vocabulary entry of one
    # position, so it enters the sum over V once per entry (V times); ε/V scales it back.
    smooth_tokens = seq_logprobs.sum(-1).masked_fill(~mask, 0.0).sum(-1)  # (B, K)
    smooth = (smooth_tokens + vocab * doc_logprobs).logsumexp(1)
    return _combine(-ll, -smooth, epsilon, vocab, reduce)


def rag_token_marginal(seq_logits: torch.Tensor, doc_scores: torch.Tensor) -> torch.Tensor:
    """log p(y_t | x, y<t) = logsumexp_k [ log p_η(z_k|x) + log p_θ(y_t | x, z_k, y<t) ], shape (B, T, V)."""
    seq_logprobs, doc_logprobs = _split(seq_logits, doc_scores)
    return (seq_logprobs + doc_logprobs[:, :, None, None]).logsumexp(1)


def rag_token_loss(seq_logits: torch.Tensor, doc_scores: torch.Tensor, target: torch.Tensor, *, pad_id: int,
                   epsilon: float = 0.0, reduce: bool = True) -> RagLoss:
    marginal = rag_token_marginal(seq_logits, doc_scores)
    mask = target.ne(pad_id)
    ll = marginal.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0).sum(-1)
    smooth = marginal.sum(-1).masked_fill(~mask, 0.0).sum(-1)
    return _combine(-ll, -smooth, epsilon, marginal.shape[-1], reduce)


def _combine(nll: torch.Tensor, smooth: torch.Tensor, epsilon: float, vocab: int, reduce: bool) -> RagLoss:
    if reduce:
        nll, smooth = nll.sum(), smooth.sum()
    return RagLoss((1.0 - epsilon) * nll + (epsilon / vocab) * smooth, nll)
