"""Retrieval metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from ragkit.eval.retrieval_metrics import evaluate_run, mrr_at_k, ndcg_at_k, recall_at_k


def test_ndcg_by_hand() -> None:
    # relevant docs a (rel 1) and b (rel 1); ranking x, a, y, b
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k(["x", "a", "y", "b"], {"a": 1, "b": 1}, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(["x", "a", "y", "b"], {"a": 1, "b": 1}, 2) == pytest.approx((1 / math.log2(3)) / idcg)
    assert ndcg_at_k(["a", "b"], {"a": 1, "b": 1}, 10) == pytest.approx(1.0)
    assert ndcg_at_k(["b", "a"], {"a": 2, "b": 1}, 10) == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))


def test_recall_and_mrr_by_hand() -> None:
    assert recall_at_k(["x", "a", "y"], {"a": 1, "b": 1, "c": 0}, 2) == 0.5
    assert mrr_at_k(["x", "y", "a"], {"a": 1}, 10) == pytest.approx(1 / 3)
    assert mrr_at_k(["x", "y", "a"], {"a": 1}, 2) == 0.0


def test_evaluate_run_skips_queries_without_relevant_docs_and_zeroes_missing_runs() -> None:
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 0}}
    result = evaluate_run({"q1": ["a"]}, qrels, ks=(10,))
    assert result["queries"] == 2 and result["ndcg@10"] == 0.5 and result["recall@10"] == 0.5
