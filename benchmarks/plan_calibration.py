"""Calibrate the build-time model of `ragkit index plan` (ragkit/index/build_time.py) on this machine.

Each constant of the model is measured by the operation it stands for, at a size that takes seconds:
Faiss k-means (BLAS flops), PQ encoding, assignment through an HNSW graph over 16,384 centroids, HNSW
insertion, SQLite bulk insert of short passages, SHA-256, and a sequential read of a file not in the page
cache. Run it alone (the machine is shared and noisy); it prints the constants to paste into build_time.py
and writes results/plan_calibration.json.

    python benchmarks/plan_calibration.py
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import hardware, print_table, write_result


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def main() -> None:
    import faiss

    from ragkit.index.store import PassageStore
    from ragkit.io.corpus import Passage

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    d = 768
    x = rng.standard_normal((100_000, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rows = []

    nlist, sample = 1024, 50_000
    kmeans = faiss.Kmeans(d, nlist, niter=10, max_points_per_centroid=10**6, spherical=False, verbose=False)
    seconds = timed(lambda: kmeans.train(x[:sample]))
    gemm = 10 * 2 * sample * nlist * d / seconds
    rows.append(["GEMM_FLOPS (k-means)", f"{gemm:.3g}", seconds])

    pq = faiss.ProductQuantizer(d, 96, 8)
    pq.cp.niter = 2  # the model scales by iterations (25 in a build): flops = iterations x 2 x points x 256 x d
    seconds = timed(lambda: pq.train(x[:16_384]))
    rows.append(["PQ_TRAIN_FLOPS", f"{2 * 2 * 16_384 * 256 * d / seconds:.3g}", seconds])
    seconds = timed(lambda: pq.compute_codes(x))
    pq_flops = 2 * len(x) * 256 * d / seconds
    rows.append(["PQ_ENCODE_FLOPS", f"{pq_flops:.3g}", seconds])

    centroids = rng.standard_normal((16_384, d), dtype=np.float32)
    graph = faiss.IndexHNSWFlat(d, 32)
    graph.add(centroids)
    graph.hnsw.efSearch = 16  # what IndexIVF's add uses: the quantiser's own setting, Faiss' default
    seconds = timed(lambda: graph.search(x[:20_000], 1))
    assign = seconds / (20_000 * d)
    rows.append(["HNSW_ASSIGN_SECONDS_PER_DIM", f"{assign:.3g}", seconds])

    inserted = faiss.IndexHNSWFlat(d, 32)
    seconds = timed(lambda: inserted.add(x[:20_000]))
    insert = seconds / (20_000 * d)
    rows.append(["HNSW_INSERT_SECONDS_PER_DIM (20k; grows slowly with n)", f"{insert:.3g}", seconds])

    with tempfile.TemporaryDirectory(dir=Path(__file__).parent / ".work" if (Path(__file__).parent / ".work").exists()
                                     else None) as tmp:
        import json

        from ragkit.io.corpus import iter_passages_with_lines

        # the shards' passages file read and stored, as `index build --embeddings` does (16-word passages)
        words = [" ".join(f"w{j}" for j in rng.integers(0, 20_000, 16)) for _ in range(1000)]
        lines = Path(tmp) / "passages.jsonl"
        lines.write_text("".join(json.dumps({"id": f"w{i}", "title": f"Passage {i}", "text": words[i % 1000]}) + "\n"
                                 for i in range(200_000)))
        store = PassageStore(Path(tmp) / "s.sqlite", bulk=True)

        def insert_all() -> None:
            block: list[Passage] = []
            vid = 1
            for _, passage in iter_passages_with_lines(lines):
                block.append(passage)
                if len(block) == 10_000:
                    store.insert(block, list(range(vid, vid + len(block))))
                    vid += len(block)
                    block = []
            store.commit()

        seconds = timed(insert_all)
        store.close()
        rows.append(["STORE_ROWS_PER_SECOND", f"{200_000 / seconds:.3g}", seconds])

        blob = Path(tmp) / "blob"
        with open(blob, "wb") as handle:
            for _ in range(8):
                handle.write(os.urandom(128 * 2**20))
            handle.flush()
            os.fsync(handle.fileno())
        fd = os.open(blob, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # out of the page cache: a cold read
        os.close(fd)

        def read_all() -> None:
            with open(blob, "rb") as handle:
                while handle.read(64 * 2**20):
                    pass

        seconds = timed(read_all)
        rows.append(["READ_BYTES_PER_SECOND", f"{2**30 / seconds:.3g}", seconds])

        def hash_all() -> None:
            digest = hashlib.sha256()
            with open(blob, "rb") as handle:
                while chunk := handle.read(64 * 2**20):
                    digest.update(chunk)

        seconds = timed(hash_all)
        rows.append(["HASH_BYTES_PER_SECOND", f"{2**30 / seconds:.3g}", seconds])

    print_table("build-time model constants, measured here", ["constant", "value", "seconds measured"], rows)
    write_result("plan_calibration", {"benchmark": "plan_calibration", "hardware": hardware(),
                                      "constants": {r[0].split(" ")[0]: float(r[1]) for r in rows},
                                      "seconds": {r[0].split(" ")[0]: r[2] for r in rows}})


if __name__ == "__main__":
    main()
