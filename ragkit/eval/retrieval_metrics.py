"""Retrieval metrics as trec_eval/pytrec_eval (and so BEIR) define them: nDCG@k, recall@k, MRR@k.

Hand-written because they are a few lines each and pulling pytrec_eval (a C extension) into the
runtime for them is not worth it; tests check them against hand-computed cases.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

Qrels = Mapping[str, Mapping[str, int]]  # query id -> doc id -> relevance (> 0 is relevant)
Run = Mapping[str, Sequence[str]]  # query id -> ranked doc ids


def ndcg_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    """Linear gains (trec_eval's ndcg_cut): sum rel_i / log2(i + 1) over the top k, over the ideal."""
    dcg = sum(relevant.get(doc, 0) / math.log2(i + 2) for i, doc in enumerate(ranked[:k]))
    ideal = sorted((r for r in relevant.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    wanted = {d for d, r in relevant.items() if r > 0}
    return len(wanted & set(ranked[:k])) / len(wanted) if wanted else 0.0


def mrr_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    for i, doc in enumerate(ranked[:k]):
        if relevant.get(doc, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def evaluate_run(run: Run, qrels: Qrels, *, ks: Sequence[int] = (10, 100)) -> dict[str, float]:
    """Mean metrics over the queries that have qrels (as BEIR does); a query missing from the run scores 0."""
    queries = [q for q, rel in qrels.items() if any(r > 0 for r in rel.values())]
    out: dict[str, float] = {}
    for k in ks:
        out[f"ndcg@{k}"] = sum(ndcg_at_k(run.get(q, []), qrels[q], k) for q in queries) / len(queries)
        out[f"recall@{k}"] = sum(recall_at_k(run.get(q, []), qrels[q], k) for q in queries) / len(queries)
    out["mrr@10"] = sum(mrr_at_k(run.get(q, []), qrels[q], 10) for q in queries) / len(queries)
    out["queries"] = len(queries)
    return out
