"""Encoder backends on BEIR SciFact: passages/s, peak memory and nDCG@10, each against plain
`SentenceTransformer.encode` (the baseline, not ragkit code) in the same run.

Every backend runs in its own process (so that its peak RSS is its own) on the same passages, in the same
order, at the same batch size: the baseline; ragkit's `--backend torch` and `int8` (PyTorch); `onnx` and
`onnx-int8` (ONNX Runtime); `openvino`, `openvino-bf16` and `openvino-int8` (OpenVINO). The export an
exported backend makes once is timed separately (a fresh cache per run; openvino-int8's includes its
calibration on 300 passages spread over the first 4,096, as `ragkit embed` would take them). Queries are embedded by the same backend; nDCG@10 comes
from exact inner-product search over its vectors. `--batch-sizes 16,32,64 --limit 1000` sweeps batch sizes
on the first passages (SciFact's are long: most fill MiniLM's 256 tokens).

    python benchmarks/encoder_backends.py [--backends ...] [--batch-sizes 32] [--limit N] [--tag NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import RESULTS, SHARED_DATA, hardware, peak_rss_mib, print_table, write_result

BASELINE = "sentence-transformers"
BACKENDS = (BASELINE, "torch", "int8", "onnx", "onnx-int8", "openvino", "openvino-bf16", "openvino-int8")
MODEL = "minilm"


def scifact_texts(limit: int | None) -> tuple[list[str], list[str], list[str], list[str], dict]:
    from scifact_index_quality import load_scifact

    from ragkit.io.corpus import read_passages

    data = SHARED_DATA / "beir_scifact"
    _, queries, qrels = load_scifact(data)
    passages = read_passages(data / "corpus.jsonl")[:limit]
    return [p.id for p in passages], [p.embedding_text() for p in passages], list(queries), list(queries.values()), qrels


def export_only(backend: str, limit: int | None, out: Path) -> None:
    """An exported backend's one-time export in its own process (its time and peak memory are not the
    encoding's). openvino-int8 calibrates as `ragkit embed` would: on a sample of the first block."""
    from ragkit.models.encoder import Encoder
    from ragkit.models.exported import EXPORTED_BACKENDS, calibration_sample

    _, texts, _, _, _ = scifact_texts(limit)
    began = time.perf_counter()
    encoder = Encoder(MODEL, device="cpu", backend=backend)
    if EXPORTED_BACKENDS[backend].calibrated:
        encoder.encode(calibration_sample(texts[:4096]))
    (out / "export.json").write_text(json.dumps({"export_s": time.perf_counter() - began, "peak_rss_mib": peak_rss_mib()}))


def worker(backend: str, batch_size: int, limit: int | None, out: Path) -> None:
    """One backend in this process: load (from the cache), warm up, time the corpus, embed the queries."""
    _, texts, _, queries, _ = scifact_texts(limit)
    began = time.perf_counter()
    if backend == BASELINE:
        from sentence_transformers import SentenceTransformer

        from ragkit.models.dpr import embedder_location
        from ragkit.models.registry import resolve

        model = SentenceTransformer(embedder_location(resolve(MODEL)), device="cpu")

        def encode(batch: list[str]) -> np.ndarray:
            return model.encode(batch, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    else:
        from ragkit.models.encoder import Encoder

        encoder = Encoder(MODEL, device="cpu", backend=backend)

        def encode(batch: list[str]) -> np.ndarray:
            return encoder.encode(batch, batch_size=batch_size)
    load_s = time.perf_counter() - began
    encode(texts[:batch_size])  # warm-up: first-call allocations and kernel selection
    began = time.perf_counter()
    vectors = encode(texts)
    seconds = time.perf_counter() - began
    began = time.perf_counter()
    query_vectors = encode(queries)
    query_seconds = time.perf_counter() - began
    np.save(out / "passages.npy", vectors)
    np.save(out / "queries.npy", query_vectors)
    (out / "result.json").write_text(json.dumps({
        "load_s": load_s, "seconds": seconds, "passages_per_s": len(texts) / seconds,
        "queries_per_s": len(queries) / query_seconds, "peak_rss_mib": peak_rss_mib()}))


def run_backend(backend: str, batch_size: int, limit: int | None, work: Path, cache: Path) -> dict[str, Any]:
    out = work / f"{backend}-{batch_size}"
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAGKIT_HOME": str(cache)}  # a fresh cache: exports are made (and timed) in this run
    exported = backend not in (BASELINE, "torch", "int8")
    if exported:
        subprocess.run([sys.executable, __file__, "--export-only", backend, *(["--limit", str(limit)] if limit else []),
                        "--out", str(out)], check=True, env=env)
    subprocess.run([sys.executable, __file__, "--worker", backend, "--batch-sizes", str(batch_size),
                    *(["--limit", str(limit)] if limit else []), "--out", str(out)], check=True, env=env)
    result = json.loads((out / "result.json").read_text())
    if exported:
        export = json.loads((out / "export.json").read_text())
        result.update(export_s=export["export_s"], export_peak_rss_mib=export["peak_rss_mib"])
    result["vectors"] = np.load(out / "passages.npy")
    result["query_vectors"] = np.load(out / "queries.npy")
    return result


def ndcg(ids: list[str], qids: list[str], qrels: dict, vectors: np.ndarray, query_vectors: np.ndarray) -> dict[str, float]:
    import faiss

    from ragkit.eval.retrieval_metrics import evaluate_run

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    _, rows = index.search(query_vectors, 100)
    return evaluate_run({q: [ids[i] for i in row if i >= 0] for q, row in zip(qids, rows)}, qrels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--batch-sizes", default="32")
    parser.add_argument("--limit", type=int, default=None, help="only the first N passages")
    parser.add_argument("--tag", default=None, help="results key (default: full, or first<N>)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--export-only", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.export_only:
        export_only(args.export_only, args.limit, args.out)
        return
    if args.worker:
        worker(args.worker, batch_sizes[0], args.limit, args.out)
        return
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if BASELINE not in backends:
        backends.insert(0, BASELINE)  # every ratio is to the baseline measured in this run
    ids, texts, qids, _, qrels = scifact_texts(args.limit)
    hw = hardware()
    tag = args.tag or (f"first{args.limit}" if args.limit else "full")
    rows, entries = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for batch_size in batch_sizes:
            cache = Path(tmp) / f"cache-{batch_size}"
            results = {b: run_backend(b, batch_size, args.limit, Path(tmp), cache) for b in backends}
            base = results[BASELINE]
            base_metrics = ndcg(ids, qids, qrels, base["vectors"], base["query_vectors"])
            for backend, result in results.items():
                metrics = ndcg(ids, qids, qrels, result["vectors"], result["query_vectors"])
                cosine = (result["vectors"] * base["vectors"]).sum(axis=1)
                entry = {k: result[k] for k in ("load_s", "seconds", "passages_per_s", "queries_per_s", "peak_rss_mib",
                                                "export_s", "export_peak_rss_mib") if k in result}
                entry.update(metrics, batch_size=batch_size, speedup=result["passages_per_s"] / base["passages_per_s"],
                             ndcg10_loss_points=100 * (base_metrics["ndcg@10"] - metrics["ndcg@10"]),
                             min_cosine_to_baseline=float(cosine.min()), mean_cosine_to_baseline=float(cosine.mean()))
                entries[f"{backend}@{batch_size}"] = entry
                rows.append([backend, batch_size, entry["passages_per_s"], f"{entry['speedup']:.2f}x",
                             metrics["ndcg@10"], f"{-entry['ndcg10_loss_points']:+.2f}", float(cosine.min()),
                             entry["queries_per_s"], entry.get("export_s", 0.0), entry["load_s"], entry["peak_rss_mib"]])
    print_table(f"Encoder backends, SciFact ({len(texts)} passages, {len(qids)} queries), {MODEL} — "
                f"{hw['cpu']}, {hw['cores']} cores",
                ["backend", "batch", "passages/s", "vs ST", "nDCG@10", "Δ pt", "min cos", "queries/s", "export s",
                 "load s", "peak MiB"], rows)
    path = RESULTS / "encoder_backends.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    saved.setdefault("runs", {})[tag] = {"hardware": hw, "passages": len(texts), "queries": len(qids), "model": MODEL,
                                          "results": entries}
    print(f"wrote {write_result('encoder_backends', saved)}")


if __name__ == "__main__":
    main()
