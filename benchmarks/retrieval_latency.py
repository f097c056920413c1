"""Seconds per retrieval call seen by training worker 0 as the number of training workers grows (1, 2, 4
worker processes, batch 8 queries each, all calling at once), for three ways of serving one index:

  * rank-0-serves-all: one server process answers every worker (the HF RAG `pytorch` retriever's design:
    rank 0 holds the index and the others wait on it) — here one Ray actor that every worker shares;
  * Ray actors: one replica per worker (`--distributed-retriever ray --num-retrieval-workers N`);
  * in-process: every worker holds its own copy (N times the memory).

Workers are separate processes (spawned, as torchrun ranks are) that connect to one local Ray and find
the actors by name (`RayIndexClient(name=...)`, what `ragkit train` ranks do); a barrier starts their calls
together. Index: flat, 100k random unit vectors of dimension 384 (MiniLM's).

    python benchmarks/retrieval_latency.py [--passages 100000] [--calls 30]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
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


def worker(how: str, rank: int, workers: int, address: str, calls: int, dim: int, barrier, results) -> None:
    """One training worker: connect, find its searcher, wait for the others, then time `calls` searches."""
    os.environ["RAY_ADDRESS"] = address
    if how == "in-process":
        from ragkit.index import Index

        search = Index.open(WORK, threads=1).search
    else:
        from ragkit.retrieval.ray_retriever import RayIndexClient

        name = f"latency-shared-{workers}" if how == "rank0" else f"latency-replica-{workers}-{rank}"
        client = RayIndexClient([WORK], num_workers=1, cpus_per_worker=0.01, threads=1, name=name)
        search = client.search
    queries = np.random.default_rng(1 + rank).standard_normal((calls, 8, dim)).astype(np.float32)
    search(queries[0], 5)  # connections and first-call costs outside the timing
    barrier.wait()
    times = []
    for c in range(calls):
        began = time.perf_counter()
        search(queries[c], 5)
        times.append(time.perf_counter() - began)
    if rank == 0:
        results.put(statistics.median(times))


def measure(how: str, workers: int, address: str, calls: int, dim: int) -> float:
    shared = None
    if how == "rank0":  # the parent owns the one server, so that it outlives any single worker
        from ragkit.retrieval.ray_retriever import RayIndexClient

        shared = RayIndexClient([WORK], num_workers=1, cpus_per_worker=0.01, threads=1, name=f"latency-shared-{workers}")
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(how, r, workers, address, calls, dim, barrier, results))
             for r in range(workers)]
    for p in procs:
        p.start()
    seconds = results.get(timeout=600)
    for p in procs:
        p.join()
    if shared is not None:
        shared.shutdown()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    build(args.passages, args.dim)

    import ray

    from ragkit.retrieval.ray_retriever import start_ray

    start_ray(num_cpus=8)  # logical CPUs for scheduling; the actors ask for 0.01 each
    address = ray.get_runtime_context().gcs_address
    results: dict[str, dict[str, float]] = {}
    rows = []
    for n in (1, 2, 4):
        served = measure("rank0", n, address, args.calls, args.dim)
        ray_s = measure("replicas", n, address, args.calls, args.dim)
        local_s = measure("in-process", n, address, args.calls, args.dim)
        results[str(n)] = {"rank0_serves_all_s": served, "ray_actors_s": ray_s, "in_process_s": local_s,
                           "ratio_rank0_over_ray": served / ray_s}
        rows.append([n, served, ray_s, served / ray_s, local_s])
    ray.shutdown()
    hw = hardware()
    print_table(f"seconds per retrieval call seen by worker 0 (worker processes, batch 8, k 5, flat "
                f"{args.passages:,} x {args.dim}) — {hw['cpu']}, {hw['cores']} cores",
                ["training workers", "rank-0 serves all", "Ray actors (1 per worker)", "ratio", "in-process copies"], rows)
    print(f"wrote {write_result('retrieval_latency', {'hardware': hw, 'args': vars(args), 'workers': 'processes', 'results': results})}")


if __name__ == "__main__":
    main()
