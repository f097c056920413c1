"""Memory, speed and quality costs of ragkit's quantisation options, each against its float baseline in
the same run:
  * index: flat float32 vs SQ8 vs PQ (Faiss codes) on BEIR SciFact, MiniLM vectors: nDCG@10, bytes;
  * encoder: `--backend torch` vs `--backend int8` (dynamic int8 Linear layers): passages/s, nDCG@10;
  * generator: SmolLM2-135M fp32 vs `--quantize int8`: PopQA (first 100, top-3 released ctxs) match,
    questions/s, weight bytes.

    python benchmarks/quantisation.py [--n 100]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

from _common import SHARED_DATA, hardware, print_table, write_result
from scifact_index_quality import load_scifact


def weight_bytes(model) -> int:
    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100)
    args = parser.parse_args()

    from ragkit.eval.retrieval_metrics import evaluate_run
    from ragkit.eval.tasks import get_task, load_examples
    from ragkit.index import Index
    from ragkit.io.corpus import read_passages
    from ragkit.models.encoder import Encoder
    from ragkit.models.generator import GenerationConfig, Generator
    from ragkit.reader import ReaderConfig, answer, questions_from_examples

    data = SHARED_DATA / "beir_scifact"
    _, queries, qrels = load_scifact(data)
    qids = list(queries)
    passages = read_passages(data / "corpus.jsonl")
    texts = [p.embedding_text() for p in passages]
    results: dict[str, dict] = {}

    # -- encoder: float vs int8 ------------------------------------------------------------------
    encoders = {"torch": Encoder("minilm", device="cpu"), "int8": Encoder("minilm", device="cpu", backend="int8")}
    vectors, q_vectors = {}, {}
    for name, enc in encoders.items():
        enc.encode(texts[:64])  # warm-up
        began = time.perf_counter()
        vectors[name] = enc.encode(texts, batch_size=64)
        seconds = time.perf_counter() - began
        q_vectors[name] = enc.encode_queries([queries[q] for q in qids])
        results[f"encoder_{name}"] = {"passages_per_s": len(texts) / seconds, "seconds": seconds}
    # -- index: flat vs SQ8 vs PQ over the float vectors; int8 encoder through flat ----------------
    rows_index, rows_encoder = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in ("flat", "SQ8", "PQ48x8"):
            index = Index.build(Path(tmp) / spec, passages, vectors["torch"], encoders["torch"].info, spec=spec)
            hits = index.search(q_vectors["torch"], 100)
            metrics = evaluate_run({q: [h.id for h in row] for q, row in zip(qids, hits)}, qrels)
            size = (index.version_dir / "vectors.faiss").stat().st_size
            results[f"index_{spec}"] = {**metrics, "vector_bytes": size}
            rows_index.append([spec, metrics["ndcg@10"], metrics["recall@100"], size / 2**20])
        for name in ("torch", "int8"):
            index = Index.build(Path(tmp) / f"enc-{name}", passages, vectors[name], encoders["torch"].info, spec="flat")
            hits = index.search(q_vectors[name], 100)
            metrics = evaluate_run({q: [h.id for h in row] for q, row in zip(qids, hits)}, qrels)
            results[f"encoder_{name}"].update(metrics)
            rows_encoder.append([name, results[f"encoder_{name}"]["passages_per_s"], metrics["ndcg@10"]])
    speedup = results["encoder_int8"]["passages_per_s"] / results["encoder_torch"]["passages_per_s"]
    results["encoder_int8"]["speedup"] = speedup
    results["encoder_int8"]["ndcg@10_loss_points"] = 100 * (results["encoder_torch"]["ndcg@10"] - results["encoder_int8"]["ndcg@10"])

    # -- generator: fp32 vs int8 -----------------------------------------------------------------
    task = get_task("popqa")
    examples = load_examples(task, SHARED_DATA / "popqa" / "popqa_longtail_w_gs.first100.jsonl", args.n)
    questions = questions_from_examples(examples)
    reader = ReaderConfig(arch="rag", k=3, source="ctxs")
    config = GenerationConfig(max_new_tokens=32, batch_size=8, stop=("\n",))
    rows_gen = []
    for quantize in ("none", "int8"):
        generator = Generator("smollm2-135m", device="cpu", dtype="float32", quantize=quantize)
        answer(questions[:2], generator, config, reader)  # warm-up
        began = time.perf_counter()
        out = answer(questions, generator, config, reader)
        seconds = time.perf_counter() - began
        match = sum(task.score(e, r["output"])["match"] for e, r in zip(examples, out)) / len(out)
        size = weight_bytes(generator.model)
        results[f"generator_{quantize}"] = {"match": match, "questions_per_s": len(out) / seconds, "weight_bytes": size,
                                            "answers": [r["output"] for r in out]}
        rows_gen.append([quantize, match, len(out) / seconds, size / 2**20])
    same = sum(a == b for a, b in zip(results["generator_none"]["answers"], results["generator_int8"]["answers"]))
    results["generator_int8"]["identical_answers"] = same

    hw = hardware()
    title = f"{hw['cpu']}, {hw['cores']} cores"
    print_table(f"Index codes on SciFact (MiniLM vectors) — {title}", ["spec", "nDCG@10", "R@100", "vectors MiB"], rows_index)
    print_table(f"Encoder backends, SciFact corpus ({len(texts)} passages, batch 64) — {title}",
                ["backend", "passages/s", "nDCG@10"], rows_encoder)
    print(f"int8 encoder: {speedup:.2f}x passages/s, {results['encoder_int8']['ndcg@10_loss_points']:+.2f} points nDCG@10 lost")
    print_table(f"Generator, PopQA first {len(examples)} (top-3 released ctxs), SmolLM2-135M — {title}",
                ["quantize", "match", "questions/s", "weights MiB"], rows_gen)
    print(f"identical answers fp32 vs int8: {same}/{len(examples)}")
    for r in ("generator_none", "generator_int8"):
        results[r].pop("answers")
    print(f"wrote {write_result('quantisation', {'hardware': hw, 'results': results})}")


if __name__ == "__main__":
    main()
