"""Search speed and recall@10 of ragkit's HNSW and IVF-PQ against exact flat search, on ~200k vectors,
with raw Faiss on the same factory strings side by side (the ratio is ragkit's overhead: id mapping,
merging segments, tombstone filtering). ragkit reads a hit's passage from SQLite when a field of it is
first read: the "with texts" column reads every hit's text, the plain one the ids and scores Faiss gives.
Each QPS is the best of three runs after a warm-up search (the first search after `Index.open` reads the
Faiss files). The "with deltas" rows search the same index after two adds of 1,000 passages and a remove of 100
(base + 3 delta segments, 100 tombstones), against raw Faiss holding the same live vectors.

The vectors are synthetic (a mixture of 1,000 Gaussian clusters in 384 dimensions, normalised), since
no 200k-passage corpus ships here; recall is measured against exact search on the same vectors.

    python benchmarks/search_speed.py [--n 200000] [--queries 1000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import hardware, print_table, write_result


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def best_qps(search, queries: np.ndarray, reps: int = 3) -> float:
    """Queries per second of the best of `reps` timed runs (the machine is shared and noisy)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        search(queries)
        times.append(time.perf_counter() - t0)
    return len(queries) / min(times)


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[:10]) & set(t[:10])) / 10 for f, t in zip(found, truth)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args()

    import faiss

    from ragkit.index import Index
    from ragkit.index.vectors import set_search_params
    from ragkit.io.corpus import Passage
    from ragkit.models.encoder import EncoderInfo

    data = clustered(args.n + args.queries, args.dim, 1000, seed=0)
    base, queries = data[: args.n], data[args.n :]
    passages = [Passage(f"v{i}", f"passage {i}") for i in range(args.n)]
    enc = EncoderInfo("synthetic", args.dim, True, None, "synthetic")
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(base)
    t0 = time.perf_counter()
    _, truth = exact.search(queries, 10)
    exact_qps = args.queries / (time.perf_counter() - t0)

    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in ("flat", "hnsw", "ivf-pq"):
            t0 = time.perf_counter()
            index = Index.build(Path(tmp) / spec, passages, base, enc, spec=spec)
            build_s = time.perf_counter() - t0
            index.search(queries[:10], k=10)  # the first search reads the Faiss files (Index.open is lazy)
            hits = index.search(queries, k=10)
            qps = best_qps(lambda q: index.search(q, k=10), queries)
            qps_texts = best_qps(lambda q: [[h.text for h in row] for row in index.search(q, k=10)], queries)
            found = np.array([[int(h.id[1:]) for h in row] for row in hits])

            # raw Faiss on the same factory string and search parameters, no ragkit around it
            raw = faiss.index_factory(args.dim, index.manifest["factory"], faiss.METRIC_INNER_PRODUCT)
            t0 = time.perf_counter()
            if not raw.is_trained:
                raw.train(base[np.random.default_rng(0).choice(args.n, min(args.n, max(20_000, 100 * getattr(raw, "nlist", 1))), replace=False)])
            raw.add(base)
            raw_build_s = time.perf_counter() - t0
            set_search_params(raw, index.spec.search_params())
            _, raw_found = raw.search(queries, 10)
            raw_qps = best_qps(lambda q: raw.search(q, 10), queries)
            results[spec] = {
                "spec": index.manifest["spec"], "factory": index.manifest["factory"],
                "ragkit": {"build_s": build_s, "qps": qps, "qps_with_texts": qps_texts,
                           "recall@10": recall_at_10(found, truth)},
                "faiss": {"build_s": raw_build_s, "qps": raw_qps, "recall@10": recall_at_10(raw_found, truth)},
                "qps_ratio_ragkit_over_faiss": qps / raw_qps,
                "qps_ratio_with_texts": qps_texts / raw_qps,
            }
            rows.append([index.manifest["spec"], results[spec]["ragkit"]["recall@10"], qps, qps_texts, raw_qps,
                         qps / raw_qps, build_s, raw_build_s])

            # the same index with deltas and tombstones, against raw Faiss holding the same live vectors
            extra = clustered(2000, args.dim, 1000, seed=1)
            enc_passages = [Passage(f"v{args.n + i}", f"passage {args.n + i}") for i in range(2000)]
            index.upsert(enc_passages[:1000], extra[:1000], enc)
            index.upsert(enc_passages[1000:], extra[1000:], enc)
            index.remove([f"v{i}" for i in range(0, 100)])
            live = np.concatenate([base[100:], extra])
            t0 = time.perf_counter()
            index.search(queries[:10], k=10)  # reads the deltas' Faiss files and merges them into the base
            first_s = time.perf_counter() - t0
            qps_d = best_qps(lambda q: index.search(q, k=10), queries)
            raw.reset()
            raw.add(live)
            raw_qps_d = best_qps(lambda q: raw.search(q, 10), queries)
            results[spec]["with_deltas"] = {"segments": index.info()["segments"], "tombstones": index.info()["tombstones"],
                                            "ragkit_qps": qps_d, "faiss_qps": raw_qps_d, "ratio": qps_d / raw_qps_d,
                                            "first_search_s": first_s}
            rows.append([f"{index.manifest['spec']} with deltas", "", qps_d, "", raw_qps_d, qps_d / raw_qps_d, "", ""])
    hw = hardware()
    print_table(
        f"{args.n:,} x {args.dim} vectors, {args.queries} queries, k=10 — {hw['cpu']}, {hw['cores']} cores",
        ["spec", "recall@10 vs exact", "ragkit QPS", "ragkit QPS with texts", "faiss QPS", "ratio", "ragkit build s",
         "faiss build s"], rows,
    )
    path = write_result("search_speed", {"hardware": hw, "n": args.n, "dim": args.dim, "queries": args.queries,
                                          "exact_faiss_qps": exact_qps, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
