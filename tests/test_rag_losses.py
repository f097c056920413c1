"""RAG marginalisations against brute force and against transformers' own RAG classes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ragkit.archs.rag.losses import rag_sequence_loss, rag_token_loss, rag_token_marginal

B, K, T, V, PAD = 2, 3, 4, 7, 0


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    seq_logits = torch.randn(B * K, T, V, generator=g)
    doc_scores = torch.randn(B, K, generator=g)
    target = torch.tensor([[3, 5, 2, 6], [4, 1, 6, PAD]])  # the second answer is one token shorter
    return seq_logits, doc_scores, target


def test_rag_sequence_matches_brute_force(tensors) -> None:
    seq_logits, doc_scores, target = tensors
    lp = torch.log_softmax(seq_logits, -1).view(B, K, T, V)
    prior = torch.softmax(doc_scores, 1)
    for b in range(B):
        # p(y|x) = Σ_k p(z_k|x) Π_t p(y_t|z_k, y<t), computed in probability space
        p = sum(prior[b, k] * math.prod(math.exp(lp[b, k, t, target[b, t]]) for t in range(T) if target[b, t] != PAD)
                for k in range(K))
        got = rag_sequence_loss(seq_logits, doc_scores, target, pad_id=PAD, reduce=False).nll[b]
        assert got.item() == pytest.approx(-math.log(p), rel=1e-5)


def test_rag_token_matches_brute_force(tensors) -> None:
    seq_logits, doc_scores, target = tensors
    probs = torch.softmax(seq_logits, -1).view(B, K, T, V)
    prior = torch.softmax(doc_scores, 1)
    marginal = rag_token_marginal(seq_logits, doc_scores).exp()
    for b, t, v in itertools.product(range(B), range(T), range(V)):
        expected = sum(prior[b, k] * probs[b, k, t, v] for k in range(K))
        assert marginal[b, t, v].item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(marginal.sum(-1), torch.ones(B, T), atol=1e-5)  # a distribution at every step
    nll = rag_token_loss(seq_logits, doc_scores, target, pad_id=PAD, reduce=False).nll
    expected0 = -sum(math.log(marginal[0, t, target[0, t]]) for t in range(T))
    assert nll[0].item() == pytest.approx(expected0, rel=1e-5)


def test_one_passage_reduces_to_plain_cross_entropy(tensors) -> None:
    seq_logits, _, target = tensors
    logits = seq_logits.view(B, K, T, V)[:, 0]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V), target.reshape(-1), ignore_index=PAD, reduction="sum")
    for fn in (rag_sequence_loss, rag_token_loss):
        assert fn(logits.reshape(B, T, V), torch.zeros(B, 1), target, pad_id=PAD).nll.item() == pytest.approx(ce.item(), rel=1e-5)


def test_doc_scores_receive_gradient(tensors) -> None:
    seq_logits, doc_scores, target = tensors
    for fn in (rag_sequence_loss, rag_token_loss):
        scores = doc_scores.clone().requires_grad_(True)
        fn(seq_logits, scores, target, pad_id=PAD, epsilon=0.1).loss.backward()
        assert scores.grad is not None and scores.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def hf_rag_models():
    from transformers import BartConfig, DPRConfig, RagConfig, RagSequenceForGeneration, RagTokenForGeneration

    q = DPRConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    g = BartConfig(vocab_size=V, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                   decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, pad_token_id=PAD,
                   bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None)
    config = RagConfig.from_question_encoder_generator_configs(q, g, n_docs=K)
    return RagSequenceForGeneration(config), RagTokenForGeneration(config)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_agrees_with_transformers_rag(hf_rag_models, tensors, epsilon: float) -> None:
    seq_model, token_model = hf_rag_models
    seq_logits, doc_scores, target = tensors
    # HF shifts its target left by one (dropping the decoder-start token); give it [start] + ours.
    hf_target = torch.cat([torch.full((B, 1), 2), target], dim=1)[:, :T]
    ours_target = torch.cat([target[:, : T - 1], torch.full((B, 1), PAD)], dim=1)
    hf_seq = seq_model.get_nll(seq_logits, doc_scores, hf_target, reduce_loss=False, epsilon=epsilon, n_docs=K)
    hf_tok = token_model.get_nll(seq_logits, doc_scores, hf_target, reduce_loss=False, epsilon=epsilon, n_docs=K)
    ours_seq = rag_sequence_loss(seq_logits, doc_scores, ours_target, pad_id=PAD, epsilon=epsilon, reduce=False).loss
    ours_tok = rag_token_loss(seq_logits, doc_scores, ours_target, pad_id=PAD, epsilon=epsilon, reduce=False).loss
    assert torch.allclose(ours_seq, hf_seq, atol=1e-5), (ours_seq, hf_seq)
    assert torch.allclose(ours_tok, hf_tok, atol=1e-5), (ours_tok, hf_tok)
