"""BEIR SciFact: dense (all-MiniLM-L6-v2), sparse (the index's bm25s side) and hybrid retrieval through one
ragkit index, beside the published numbers (MiniLM 0.6451 MTEB; BM25 0.6789 Anserini) and the strongest
baseline measured in the same run (plain bm25s with the same tokenisation).

    python benchmarks/scifact_hybrid.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from _common import SHARED_DATA, hardware, print_table, write_result
from scifact_index_quality import load_scifact

WORK = Path(__file__).resolve().parent / ".work" / "scifact_hybrid_idx"


def main() -> None:
    from ragkit.eval.retrieval_metrics import evaluate_run
    from ragkit.index import Index
    from ragkit.index.sparse import SparseConfig
    from ragkit.io.corpus import read_passages
    from ragkit.models.encoder import Encoder
    from ragkit.retrieval.retriever import RetrievalMode, Retriever

    data = SHARED_DATA / "beir_scifact"
    _, queries, qrels = load_scifact(data)
    qids = list(queries)
    texts = [queries[q] for q in qids]
    if not Index.exists(WORK):
        passages = read_passages(data / "corpus.jsonl")
        encoder = Encoder("minilm", device="cpu")
        vectors = encoder.encode([p.embedding_text() for p in passages], batch_size=64)
        Index.build(WORK, passages, vectors, encoder.info, spec="flat", sparse=SparseConfig())
    index = Index.open(WORK)

    runs = [("dense (MiniLM, flat)", RetrievalMode("dense")), ("sparse (BM25 side)", RetrievalMode("sparse"))]
    for w in (0.3, 0.5, 0.7):
        runs.append((f"hybrid rrf, dense weight {w}", RetrievalMode("hybrid", "rrf", w)))
    for w in (0.3, 0.5, 0.7):
        runs.append((f"hybrid score, dense weight {w}", RetrievalMode("hybrid", "score", w)))
    results, rows = {}, []
    for label, mode in runs:
        retriever = Retriever(index, device="cpu", mode=mode)
        began = time.perf_counter()
        hits = retriever.retrieve(texts, 100)
        seconds = time.perf_counter() - began
        metrics = evaluate_run({q: [h.id for h in row] for q, row in zip(qids, hits)}, qrels)
        results[label] = {**metrics, "qps": len(qids) / seconds, "mode": mode.__dict__}
        rows.append([label, metrics["ndcg@10"], metrics["recall@100"], metrics["mrr@10"], len(qids) / seconds])

    # the strongest baseline, run here: plain bm25s over the same files with the same settings
    import bm25s
    import Stemmer

    corpus = [json.loads(line) for line in (data / "corpus.jsonl").open()]
    stemmer = Stemmer.Stemmer("english")
    bm = bm25s.BM25(k1=1.5, b=0.75)
    bm.index(bm25s.tokenize([f"{d['title']} {d['text']}".strip() for d in corpus], stopwords="en", stemmer=stemmer,
                            show_progress=False), show_progress=False)
    began = time.perf_counter()
    found, _ = bm.retrieve(bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False), k=100,
                           show_progress=False)
    seconds = time.perf_counter() - began
    plain = evaluate_run({q: [corpus[i]["_id"] for i in row] for q, row in zip(qids, found)}, qrels)
    results["plain bm25s (baseline)"] = {**plain, "qps": len(qids) / seconds}
    rows.insert(0, ["plain bm25s (baseline)", plain["ndcg@10"], plain["recall@100"], plain["mrr@10"], len(qids) / seconds])
    published = json.loads((data / "published_results.json").read_text())
    rows.insert(0, ["published BM25 (Anserini, k1=0.9 b=0.4)", 0.6789, 0.9253, "-", "-"])
    rows.insert(0, ["published all-MiniLM-L6-v2 (MTEB)", 0.64508, 0.925, "-", "-"])
    hw = hardware()
    print_table(f"SciFact test ({len(qids)} queries, {len(index)} docs) — {hw['cpu']}, {hw['cores']} cores",
                ["system", "nDCG@10", "R@100", "MRR@10", "queries/s (k=100)"], rows)
    best = max((k for k in results if k.startswith("hybrid")), key=lambda k: results[k]["ndcg@10"])
    print(f"best hybrid: {best} nDCG@10 {results[best]['ndcg@10']:.4f}")
    print(f"wrote {write_result('scifact_hybrid', {'hardware': hw, 'results': results, 'published': published, 'best_hybrid': best})}")


if __name__ == "__main__":
    main()
