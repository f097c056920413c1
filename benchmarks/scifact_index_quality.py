"""BEIR SciFact with the shipped all-MiniLM-L6-v2: ragkit's flat / HNSW / IVF-PQ against a plain
sentence-transformers + Faiss flat script, side by side in one run.

Quality: nDCG@10, recall@100, MRR@10 (published MTEB run: nDCG@10 0.6451, recall@100 0.925).
Speed: passages/s of ragkit's encoder path vs `SentenceTransformer.encode` (same model, batch size),
index build time and search QPS (query vectors precomputed, so this measures the index).

    python benchmarks/scifact_index_quality.py [--batch-size 64]
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path


from _common import SHARED_DATA, hardware, print_table, write_result


def load_scifact(root: Path):
    corpus = [json.loads(line) for line in (root / "corpus.jsonl").open()]
    queries = {q["_id"]: q["text"] for q in map(json.loads, (root / "queries.jsonl").open())}
    qrels: dict[str, dict[str, int]] = {}
    with (root / "qrels" / "test.tsv").open() as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    return corpus, {q: queries[q] for q in qrels}, qrels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "beir_scifact")
    args = parser.parse_args()

    import faiss
    from sentence_transformers import SentenceTransformer

    from ragkit.eval.retrieval_metrics import evaluate_run
    from ragkit.index import Index
    from ragkit.io.corpus import read_passages
    from ragkit.models.encoder import Encoder
    from ragkit.models.registry import resolve

    corpus, queries, qrels = load_scifact(args.data)
    qids = list(queries)
    doc_ids = [d["_id"] for d in corpus]
    texts = [f"{d['title']} {d['text']}" if d["title"] else d["text"] for d in corpus]

    # --- baseline: plain sentence-transformers + faiss flat -------------------------------------
    st = SentenceTransformer(resolve("minilm").location, device="cpu")
    t0 = time.perf_counter()
    base_docs = st.encode(texts, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True)
    base_encode_s = time.perf_counter() - t0
    base_q = st.encode([queries[q] for q in qids], batch_size=args.batch_size, normalize_embeddings=True)
    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(base_docs.shape[1])
    flat.add(base_docs)
    base_build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, idx = flat.search(base_q, 100)
    base_search_s = time.perf_counter() - t0
    base_run = {q: [doc_ids[i] for i in row] for q, row in zip(qids, idx)}
    baseline = evaluate_run(base_run, qrels)

    # --- ragkit: read the corpus file, embed through the Encoder, build each spec ---------------
    passages = read_passages(args.data / "corpus.jsonl")
    encoder = Encoder("minilm", device="cpu")
    t0 = time.perf_counter()
    vectors = encoder.encode([p.embedding_text() for p in passages], batch_size=args.batch_size)
    rk_encode_s = time.perf_counter() - t0
    q_vectors = encoder.encode_queries([queries[q] for q in qids], batch_size=args.batch_size)

    rows = []
    results = {"baseline_flat": {**baseline, "build_s": base_build_s, "qps": len(qids) / base_search_s}}
    rows.append(["plain ST + faiss IndexFlatIP", baseline["ndcg@10"], baseline["recall@100"], baseline["mrr@10"],
                 base_build_s, len(qids) / base_search_s])
    with tempfile.TemporaryDirectory() as tmp:
        for spec in ("flat", "hnsw", "ivf-pq"):
            t0 = time.perf_counter()
            index = Index.build(Path(tmp) / spec, passages, vectors, encoder.info, spec=spec)
            build_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            hits = index.search(q_vectors, k=100)
            search_s = time.perf_counter() - t0
            metrics = evaluate_run({q: [h.id for h in row] for q, row in zip(qids, hits)}, qrels)
            results[f"ragkit_{spec}"] = {**metrics, "spec": index.manifest["spec"], "build_s": build_s,
                                         "qps": len(qids) / search_s}
            rows.append([f"ragkit {index.manifest['spec']}", metrics["ndcg@10"], metrics["recall@100"],
                         metrics["mrr@10"], build_s, len(qids) / search_s])

    hw = hardware()
    print_table(
        f"SciFact test ({len(qids)} queries, {len(passages)} docs), all-MiniLM-L6-v2 — {hw['cpu']}, {hw['cores']} cores",
        ["system", "nDCG@10", "R@100", "MRR@10", "build s", "QPS (k=100)"], rows,
    )
    flat_ndcg = results["ragkit_flat"]["ndcg@10"]
    for spec in ("hnsw", "ivf-pq"):
        results[f"ragkit_{spec}"]["ndcg@10_below_flat_points"] = 100 * (flat_ndcg - results[f"ragkit_{spec}"]["ndcg@10"])
    speed = {
        "st_encode_passages_per_s": len(texts) / base_encode_s,
        "ragkit_encode_passages_per_s": len(texts) / rk_encode_s,
        "ratio_ragkit_over_st": base_encode_s / rk_encode_s,
        "batch_size": args.batch_size,
    }
    print_table("Encoding the corpus (same model, same batch size)", ["path", "passages/s", "ratio"], [
        ["SentenceTransformer.encode", speed["st_encode_passages_per_s"], 1.0],
        ["ragkit Encoder (ragkit embed / index build)", speed["ragkit_encode_passages_per_s"], speed["ratio_ragkit_over_st"]],
    ])
    published = json.loads((args.data / "published_results.json").read_text())
    path = write_result("scifact_index_quality", {
        "hardware": hw, "results": results, "encoding": speed, "published": published,
        "flat_minus_published_ndcg@10_points": 100 * (flat_ndcg - 0.64508),
    })
    print(f"flat nDCG@10 {flat_ndcg:.4f} vs published 0.6451 ({100 * (flat_ndcg - 0.64508):+.2f} points); wrote {path}")


if __name__ == "__main__":
    main()
