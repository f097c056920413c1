"""Seconds per retrieval call seen by training worker 0 as the number of training workers grows (1, 2, 4;
batch 8 queries each, all calling at once), for three ways of serving one index:

  * rank-0-serves-all: one server process answers every worker (the HF RAG `pytorch` retriever's design:
    rank 0 holds the index and the others wait on it) — here one Ray actor;
  * Ray actors: one replica per worker (`--distributed-retriever ray --num-retrieval-workers N`);
  * in-process: every worker holds its own copy (N times the memory).

Workers are threads of this process (a Ray call and a Faiss search both release the GIL), so the numbers
are the serving side's. Index: flat, 100k random unit vectors of dimension 384 (MiniLM's).

    python benchmarks/retrieval_latency.py [--passages 100000] [--calls 30]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from _common import hardware, print_table, write_result

WORK = Path(__file__).resolve().parent / ".work" / "latency_idx"


def build(n: int, dim: int) -> None:
    from ragkit.index import Index
    from ragkit.io.corpus import Passage
    from ragkit.models.encoder import EncoderInfo

    if Index.exists(WORK):
        return
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    passages = [Passage(f"p{i}", f"passage {i}", "") for i in range(n)]
    Index.build(WORK, passages, vectors, EncoderInfo("random", dim, True, None, "0" * 32), spec="flat")


def measure(search_for_worker, workers: int, calls: int, dim: int) -> float:
    """Median seconds per call of worker 0 while `workers` threads call concurrently."""
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((calls, 8, dim)).astype(np.float32)
    times: list[float] = []
    barrier = threading.Barrier(workers)

    def loop(w: int) -> None:
        search = search_for_worker(w)
        barrier.wait()
        for c in range(calls):
            began = time.perf_counter()
            search(queries[c], 5)
            if w == 0:
                times.append(time.perf_counter() - began)

    threads = [threading.Thread(target=loop, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    build(args.passages, args.dim)

    from ragkit.index import Index
    from ragkit.retrieval.ray_retriever import RayIndexClient

    results: dict[str, dict[str, float]] = {}
    rows = []
    for n in (1, 2, 4):
        one = RayIndexClient([WORK], num_workers=1, cpus_per_worker=0.01, threads=1)
        served = measure(lambda w: (lambda q, k: one.search(q, k)), n, args.calls, args.dim)
        one.shutdown()
        replicas = [RayIndexClient([WORK], num_workers=1, cpus_per_worker=0.01, threads=1) for _ in range(n)]
        ray_s = measure(lambda w: (lambda q, k: replicas[w].search(q, k)), n, args.calls, args.dim)
        for r in replicas:
            r.shutdown()
        local = [Index.open(WORK, threads=1) for _ in range(n)]
        local_s = measure(lambda w: (lambda q, k: local[w].search(q, k)), n, args.calls, args.dim)
        results[str(n)] = {"rank0_serves_all_s": served, "ray_actors_s": ray_s, "in_process_s": local_s,
                           "ratio_rank0_over_ray": served / ray_s}
        rows.append([n, served, ray_s, served / ray_s, local_s])
    hw = hardware()
    print_table(f"seconds per retrieval call seen by worker 0 (batch 8, k 5, flat {args.passages:,} x {args.dim}) — "
                f"{hw['cpu']}, {hw['cores']} cores",
                ["training workers", "rank-0 serves all", "Ray actors (1 per worker)", "ratio", "in-process copies"], rows)
    print(f"wrote {write_result('retrieval_latency', {'hardware': hw, 'args': vars(args), 'results': results})}")


if __name__ == "__main__":
    main()
