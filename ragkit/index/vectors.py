"""The Faiss side of the index: build from a spec, add/remove by int64 id, search, CPU/GPU, threads.

IVF indexes carry ids natively. Every other index is wrapped in `IndexIDMap2`, whose `remove_ids`
is only correct when the inner index compacts on removal (flat codes do); HNSW cannot remove at all,
so removed vectors stay as tombstones that search filters out (see `ragkit.index.index`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ragkit.errors import UsageError

from ragkit.index.spec import IndexSpec

METRICS = ("ip", "l2")


def faiss_metric(metric: str) -> int:
    import faiss

    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def new_index(spec: IndexSpec, dim: int, n: int, metric: str) -> Any:
    import faiss

    factory = spec.factory(dim, n)
    try:
        inner = faiss.index_factory(dim, factory, faiss_metric(metric))
    except RuntimeError as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise UsageError(f"index spec '{factory}' does not fit {dim}-dimensional vectors ({last})") from None
    pq = faiss.downcast_index(inner)
    if getattr(pq, "do_polysemous_training", False):
        # Faiss' factory turns on polysemous training for 8-bit PQ: simulated annealing over every codebook's
        # code order, for a Hamming pre-filter ragkit never uses (polysemous_ht stays 0). It was nearly all of
        # an IVF-PQ build's time (20k x 768, m=96: minutes, against seconds without it).
        pq.do_polysemous_training = False
    if factory.startswith("IVF"):
        return inner
    if spec.kind == "hnsw" and "ef_construction" in spec.params:
        faiss.downcast_index(inner).hnsw.efConstruction = int(spec.params["ef_construction"])
    return faiss.IndexIDMap2(inner)


MAX_TRAIN_BYTES = 1 << 30  # the training sample is held in float32: at most 1 GiB of it


def training_rows(n: int, dim: int, nlist: int, *, max_train: int = 1_000_000) -> int:
    """How many vectors IVF/PQ trains on: ~100 per list (at least 20,000), at most 1M and 1 GiB."""
    return min(n, max_train, max(100 * nlist, 20_000), MAX_TRAIN_BYTES // (4 * dim))


def train_if_needed(index: Any, vectors: np.ndarray, *, seed: int = 0, max_train: int = 1_000_000) -> None:
    """Train IVF/PQ on a random sample of `training_rows` vectors; `vectors` may be a memmap on disk (only
    the sample is read)."""
    if index.is_trained:
        return
    n = vectors.shape[0]
    nlist = getattr(_inner(index), "nlist", 1)
    size = training_rows(n, vectors.shape[1], nlist, max_train=max_train)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=size, replace=False)) if size < n else np.arange(n)
    inner = _inner(index)
    if hasattr(inner, "pq") and size < 39 * inner.pq.ksub:
        # Faiss would print one warning per sub-quantiser (dozens of lines); say it once instead.
        inner.pq.cp.min_points_per_centroid = 1
        logging.getLogger("ragkit").warning(
            "PQ trained on %d vectors (Faiss recommends %d or more): expect coarser codes", size, 39 * inner.pq.ksub
        )
    index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))


def delta_index(template: Any) -> Any:
    """The empty index a delta segment is filled into: the base's trained template, except that an HNSW
    graph over flat vectors gets a flat delta (exact search over a few thousand vectors is one BLAS call,
    cheaper than walking another graph, and gives the same scores)."""
    import faiss

    inner = _inner(template)
    if hasattr(inner, "hnsw") and isinstance(faiss.downcast_index(inner.storage), faiss.IndexFlat):
        return faiss.IndexIDMap2(faiss.IndexFlat(template.d, template.metric_type))
    return template


def write_index(index: Any, path: str, *, share_quantizer: bool = False) -> None:
    """`faiss.write_index`; with `share_quantizer`, an IVF index is written with an empty stand-in for its
    coarse quantiser, which the reader takes from the template (`lend_quantizer`). A delta segment is a
    clone of the template, and its quantiser is most of its bytes: at 16,384 lists x 768 dims with an HNSW
    graph over them, 53 MB written by every `index add` of 10 passages. Faiss has no option to leave it out."""
    import faiss

    ivf = _inner(index) if share_quantizer else None
    if not isinstance(ivf, faiss.IndexIVF):
        faiss.write_index(index, path)
        return
    real, owned = ivf.quantizer, ivf.own_fields
    stand_in = faiss.IndexFlat(ivf.d, ivf.metric_type)
    ivf.own_fields = False  # neither quantiser is freed by the IVF while they are swapped
    ivf.quantizer = stand_in
    try:
        faiss.write_index(index, path)
    finally:
        ivf.quantizer = real
        ivf.own_fields = owned


def borrows_quantizer(index: Any) -> bool:
    """Whether `index` was written by `write_index(..., share_quantizer=True)` (an empty coarse quantiser)."""
    import faiss

    ivf = _inner(index)
    return isinstance(ivf, faiss.IndexIVF) and ivf.nlist > 0 and ivf.quantizer.ntotal == 0


def lend_quantizer(index: Any, template: Any) -> None:
    """Give an IVF index written with a stand-in quantiser the template's (shared, not copied; the template
    is kept alive with it)."""
    import faiss

    ivf, trained = _inner(index), _inner(template)
    if not (isinstance(trained, faiss.IndexIVF) and trained.nlist == ivf.nlist and trained.d == ivf.d):
        raise ValueError("the template is not the IVF index this segment was cut from")
    # The IVF must not free the borrowed quantiser; the stand-in it read (an empty IndexFlat, ~100 bytes)
    # is left unfreed: handing it to Python's ownership corrupts SWIG's type bookkeeping
    ivf.own_fields = False
    ivf.quantizer = trained.quantizer
    if isinstance(ivf, faiss.IndexIVFPQ):  # its residual tables were computed from the stand-in when read
        ivf.use_precomputed_table = trained.use_precomputed_table
        ivf.precompute_table()
    index.referenced_objects = [*getattr(index, "referenced_objects", []), template]


def is_ivf(index: Any) -> bool:
    import faiss

    return isinstance(_inner(index), faiss.IndexIVF)


def is_hnsw(index: Any) -> bool:
    return hasattr(_inner(index), "hnsw")


def inner_index(index: Any) -> Any:
    """The index inside an id map (or the index itself)."""
    return _inner(index)


def _inner(index: Any) -> Any:
    import faiss

    base = faiss.downcast_index(index)
    if isinstance(base, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return faiss.downcast_index(base.index)
    return base


def add(index: Any, vectors: np.ndarray, ids: np.ndarray, *, chunk: int = 100_000) -> None:
    for start in range(0, len(ids), chunk):
        block = np.ascontiguousarray(vectors[start : start + chunk], dtype=np.float32)
        index.add_with_ids(block, np.ascontiguousarray(ids[start : start + chunk], dtype=np.int64))


def remove(index: Any, ids: np.ndarray) -> int:
    import faiss

    return int(index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))))


def set_search_params(index: Any, params: dict[str, int]) -> None:
    inner = _inner(index)
    for name, value in params.items():
        if name == "efSearch" and hasattr(inner, "hnsw"):
            inner.hnsw.efSearch = int(value)
        elif name == "nprobe" and hasattr(inner, "nprobe"):
            inner.nprobe = int(value)
            quantizer = _coarse_hnsw(inner)
            if quantizer is not None:  # the graph over the centroids must find at least the nprobe nearest
                quantizer.hnsw.efSearch = max(QUANTIZER_EF_MIN, 2 * int(value))


QUANTIZER_EF_MIN = 64  # efSearch of an HNSW coarse quantiser: at least this, and twice nprobe


def _coarse_hnsw(inner: Any) -> Any:
    import faiss

    if not isinstance(inner, faiss.IndexIVF):
        return None
    quantizer = faiss.downcast_index(inner.quantizer)
    return quantizer if hasattr(quantizer, "hnsw") else None


def search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    k = max(1, min(k, index.ntotal)) if index.ntotal else 1
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def reconstruct(index: Any, ids: np.ndarray) -> np.ndarray:
    return index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))


def set_threads(threads: int | None) -> None:
    if threads:
        import faiss

        faiss.omp_set_num_threads(int(threads))


def has_gpu() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def to_device(index: Any, device: str) -> tuple[Any, str]:
    """Move an index to a GPU when asked and possible; returns (index, where it lives)."""
    if not device.startswith("cuda"):
        return index, "cpu"
    if not has_gpu():
        # Faiss-GPU when present, CPU otherwise: the encoder may still use the GPU.
        return index, "cpu"
    import faiss

    gpu_id = int(device.split(":", 1)[1]) if ":" in device else 0
    resources = faiss.StandardGpuResources()
    try:
        gpu_index = faiss.index_cpu_to_gpu(resources, gpu_id, index)
    except RuntimeError:
        return index, "cpu"  # e.g. HNSW has no GPU implementation: search stays on the CPU
    gpu_index.referenced_resources = resources  # keep the resources alive with the index
    return gpu_index, device


def to_cpu(index: Any) -> Any:
    import faiss

    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        return faiss.index_gpu_to_cpu(index)
    return index
