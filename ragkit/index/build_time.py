"""How long `ragkit index build --embeddings` takes for a spec: a model of the build's arithmetic and I/O,
calibrated on the reference machine (2-core AMD EPYC without AVX-512, 24 GiB, virtual disk at ~1.4 GB/s
read) by benchmarks/plan_calibration.py, and checked against the 21M x 768 build of
benchmarks/wikipedia_scale.py (docs/benchmarks.md). A faster machine builds faster: the model is for
choosing between specs (which one finishes within `--max-build-time`), within ~30% on its own machine.

The terms, each the work of one phase of the streaming build (ragkit.index.builder):
- reading the vectors (float16 shards) and storing the passages in SQLite;
- IVF: k-means on the training sample (Faiss: 10 iterations, at most 256 points per centroid), then assigning
  every vector to its list, by exact search over the centroids (n·nlist·d multiply-adds) or, for an HNSW
  coarse quantiser, a graph walk whose cost grows with d, not nlist;
- PQ: training 256 centroids per sub-quantiser (25 iterations on at most 65,536 points), encoding every
  vector (256·d multiply-adds);
- HNSW: inserting every vector into the graph;
- checksumming what the version holds (the manifest records a SHA-256 of every file).
"""

from __future__ import annotations

import re

from ragkit.index.spec import IndexSpec, default_pq_m, ivf_lists
from ragkit.index.vectors import training_rows

# Calibrated by benchmarks/plan_calibration.py on the reference machine, alone (results/plan_calibration.json,
# 2026-12-07); under contention for the cores Faiss' OpenMP loops run many times slower than this.
GEMM_FLOPS = 1.43e11  # Faiss' exhaustive inner-product search through BLAS (k-means, flat assignment)
PQ_TRAIN_FLOPS = 3.1e10  # k-means of 256 centroids in 8-dim sub-spaces: far from BLAS speed
PQ_ENCODE_FLOPS = 2.7e10  # PQ encoding: many small distance tables
HNSW_ASSIGN_SECONDS_PER_DIM = 6.0e-8  # one vector through an HNSW32 graph over the centroids, per dimension
HNSW_INSERT_SECONDS_PER_DIM = 5.9e-7  # one vector inserted into an HNSW32 graph (efConstruction 40), per dim
READ_BYTES_PER_SECOND = 1.1e9  # the shards, read once for the sample and once to fill the index
STORE_ROWS_PER_SECOND = 4.8e4  # passages inserted into SQLite (bulk mode, short passages)
HASH_BYTES_PER_SECOND = 6.8e8  # SHA-256 of the version's files
FIXED_SECONDS = 5.0  # starting Python, importing Faiss, publishing

KMEANS_ITERATIONS = 10  # Faiss' IVF clustering default
PQ_ITERATIONS = 25
PQ_MAX_TRAIN = 65_536  # 256 points per centroid x 256 centroids


def phases(spec: IndexSpec, n: int, dim: int, *, vector_bytes: int = 2) -> dict[str, float]:
    """Estimated seconds of each phase of building `spec` over n vectors of dim (float16 shards by default)."""
    factory = spec.factory(dim, n)
    out = {"read": 2 * n * dim * vector_bytes / READ_BYTES_PER_SECOND, "store": n / STORE_ROWS_PER_SECOND,
           "fixed": FIXED_SECONDS}
    serve_bytes = n * dim * 4
    nlist = ivf_lists(factory)
    if nlist:
        sample = min(training_rows(n, dim, nlist), 256 * nlist)
        out["kmeans"] = KMEANS_ITERATIONS * 2 * sample * nlist * dim / GEMM_FLOPS
        graph_quantizer = "_HNSW" in factory  # IVF{nlist}_HNSW{M}: an HNSW coarse quantiser
        out["assign"] = (n * dim * HNSW_ASSIGN_SECONDS_PER_DIM if graph_quantizer
                         else 2 * n * nlist * dim / GEMM_FLOPS)
    if "PQ" in factory:
        sample = min(training_rows(n, dim, max(nlist, 1)), PQ_MAX_TRAIN)
        out["pq_train"] = PQ_ITERATIONS * 2 * sample * 256 * dim / PQ_TRAIN_FLOPS
        out["pq_encode"] = 2 * n * 256 * dim / PQ_ENCODE_FLOPS
        m = int(spec.params.get("m") or default_pq_m(dim)) if spec.kind == "ivf-pq" else dim // 4
        serve_bytes = n * (m + 8)
    if "HNSW" in factory and not nlist:
        out["hnsw_insert"] = n * dim * HNSW_INSERT_SECONDS_PER_DIM
    hashed = serve_bytes + n * 100  # the Faiss file and the passage store
    if spec.refine:
        hashed += n * dim * vector_bytes  # the exact vectors (linked from the shards, but checksummed)
    out["checksum"] = hashed / HASH_BYTES_PER_SECOND
    return out


def estimate_build_seconds(spec: IndexSpec, n: int, dim: int, *, vector_bytes: int = 2) -> float:
    return float(sum(phases(spec, n, dim, vector_bytes=vector_bytes).values()))


def format_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def parse_duration(text: str | None) -> float | None:
    """'90s', '45m', '2h', '1.5h', '600' (seconds) -> seconds."""
    from ragkit.errors import UsageError

    if text is None or str(text).strip() == "":
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min|h)?\s*", str(text), flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise UsageError(f"max_build_time '{text}': expected a positive duration such as 90s, 45m or 2h")
    scale = {None: 1, "s": 1, "m": 60, "min": 60, "h": 3600}[(match.group(2) or "").lower() or None]
    return float(match.group(1)) * scale
