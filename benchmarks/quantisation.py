"""Memory, speed and quality costs of ragkit's quantisation options, each against its float baseline in
the same run:
  * index: flat float32 vs SQ8 vs PQ (Faiss codes) on BEIR SciFact, MiniLM vectors: nDCG@10, bytes;
  * encoder: `--backend torch` vs `--backend int8` (dynamic int8 Linear layers): passages/s, nDCG@10;
  * generator: SmolLM2-135M fp32 vs `--quantize int8` (torch dynamic int8) and, when bitsandbytes is
    installed, `--quantize 4bit` / `8bit` on its CPU backend: PopQA (first 100, top-3 released ctxs)
    match, questions/s, weight bytes;
  * training: `ragkit train --arch rag` with LoRA vs QLoRA (`--quantize 4bit`), the same steps on the
    PopQA / wiki_passages data of rag_finetune_popqa.py: seconds/step, peak memory, loss.
Parts run alone too (`--parts generator,training`): they replace only their own keys in
benchmarks/results/quantisation.json, and each part records the hardware it ran on.

    python benchmarks/quantisation.py [--n 100] [--parts index,generator,training] [--train-steps 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, SHARED_DATA, hardware, print_table, write_result
from scifact_index_quality import load_scifact

PARTS = ("index", "generator", "training")


def weight_bytes(model) -> int:
    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="PopQA questions for the generator part")
    parser.add_argument("--parts", default=",".join(PARTS), help="some of: index (encoder and index codes), generator, training")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="generator and training parts: cpu or cuda (the index part is CPU)")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or not set(parts) <= set(PARTS):
        parser.error(f"--parts: expected some of {', '.join(PARTS)}")
    hw = hardware()
    title = f"{hw['cpu']}, {hw['cores']} cores"
    path = RESULTS / "quantisation.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    results: dict[str, Any] = saved.get("results", {})
    by_part: dict[str, Any] = saved.get("hardware_by_part", {})
    if "hardware" in saved:  # written before the parts were separable: index and generator ran together
        by_part = {"index": saved["hardware"], "generator": saved["hardware"]}
    for part in parts:
        {"index": bench_index, "generator": bench_generator, "training": bench_training}[part](results, args, title)
        by_part[part if part == "index" else f"{part}{device_tag(args)}"] = hw
    print(f"wrote {write_result('quantisation', {'hardware_by_part': by_part, 'results': results})}")


def device_tag(args: argparse.Namespace) -> str:
    """'' on the CPU, '_cuda' on a GPU: GPU results sit beside the CPU ones instead of replacing them."""
    return "" if args.device == "cpu" else "_" + args.device.split(":")[0]


def bench_index(results: dict[str, Any], args: argparse.Namespace, title: str) -> None:
    """Encoder backends and index codes on SciFact."""
    from ragkit.eval.retrieval_metrics import evaluate_run
    from ragkit.index import Index
    from ragkit.io.corpus import read_passages
    from ragkit.models.encoder import Encoder

    data = SHARED_DATA / "beir_scifact"
    _, queries, qrels = load_scifact(data)
    qids = list(queries)
    passages = read_passages(data / "corpus.jsonl")
    texts = [p.embedding_text() for p in passages]

    encoders = {"torch": Encoder("minilm", device="cpu"), "int8": Encoder("minilm", device="cpu", backend="int8")}
    vectors, q_vectors = {}, {}
    for name, enc in encoders.items():
        enc.encode(texts[:64])  # warm-up
        began = time.perf_counter()
        vectors[name] = enc.encode(texts, batch_size=64)
        seconds = time.perf_counter() - began
        q_vectors[name] = enc.encode_queries([queries[q] for q in qids])
        results[f"encoder_{name}"] = {"passages_per_s": len(texts) / seconds, "seconds": seconds}
    # index: flat vs SQ8 vs PQ over the float vectors; the int8 encoder's vectors through flat
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
    print_table(f"Index codes on SciFact (MiniLM vectors) — {title}", ["spec", "nDCG@10", "R@100", "vectors MiB"], rows_index)
    print_table(f"Encoder backends, SciFact corpus ({len(texts)} passages, batch 64) — {title}",
                ["backend", "passages/s", "nDCG@10"], rows_encoder)
    print(f"int8 encoder: {speedup:.2f}x passages/s, {results['encoder_int8']['ndcg@10_loss_points']:+.2f} points nDCG@10 lost")


def bench_generator(results: dict[str, Any], args: argparse.Namespace, title: str) -> None:
    """SmolLM2-135M in float32 against each quantisation this machine can run, on PopQA with passages."""
    from ragkit.eval.tasks import get_task, load_examples
    from ragkit.models.generator import GenerationConfig, Generator
    from ragkit.archs.reader.answer import ReaderConfig, answer
    from ragkit.io.queries import questions_from_examples

    task = get_task("popqa")
    examples = load_examples(task, SHARED_DATA / "popqa" / "popqa_longtail_w_gs.first100.jsonl", args.n)
    questions = questions_from_examples(examples)
    reader = ReaderConfig(arch="rag", k=3, source="ctxs")
    config = GenerationConfig(max_new_tokens=32, batch_size=8, stop=("\n",))
    # torch's dynamic int8 is a CPU kernel; bitsandbytes runs on either
    options = ["none", *(["int8"] if args.device == "cpu" else []),
               *(["4bit", "8bit"] if importlib.util.find_spec("bitsandbytes") else [])]
    rows, answers = [], {}
    for quantize in options:
        generator = Generator("smollm2-135m", device=args.device, dtype="float32" if args.device == "cpu" else "auto",
                              quantize=quantize)
        answer(questions[:2], generator, config, reader)  # warm-up
        began = time.perf_counter()
        out = answer(questions, generator, config, reader)
        seconds = time.perf_counter() - began
        match = sum(task.score(e, r["output"])["match"] for e, r in zip(examples, out)) / len(out)
        size = weight_bytes(generator.model)
        answers[quantize] = [r["output"] for r in out]
        results[f"generator{device_tag(args)}_{quantize}"] = {"match": match, "questions_per_s": len(out) / seconds, "weight_bytes": size}
        rows.append([quantize, match, len(out) / seconds, size / 2**20])
    for quantize in options[1:]:
        entry = results[f"generator{device_tag(args)}_{quantize}"]
        entry["identical_answers"] = sum(a == b for a, b in zip(answers["none"], answers[quantize]))
        entry["speedup"] = entry["questions_per_s"] / results[f"generator{device_tag(args)}_none"]["questions_per_s"]
    print_table(f"Generator, PopQA first {len(examples)} (top-3 released ctxs), SmolLM2-135M — {title}",
                ["quantize", "match", "questions/s", "weights MiB"], rows)
    for quantize in options[1:]:
        print(f"identical answers fp32 vs {quantize}: {results[f'generator{device_tag(args)}_{quantize}']['identical_answers']}/{len(examples)}")


def bench_training(results: dict[str, Any], args: argparse.Namespace, title: str) -> None:
    """LoRA vs QLoRA through `ragkit train --arch rag`, each in its own process, so that the cost
    reports' peak memory is each run's own."""
    from rag_finetune_popqa import WORK, build_data, train_rag, wiki_index

    if importlib.util.find_spec("bitsandbytes") is None:
        print("training part skipped: bitsandbytes is not installed")
        return
    train, _ = build_data()
    WORK.mkdir(parents=True, exist_ok=True)
    data = WORK / "quant_train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    index = wiki_index()
    rows = []
    for name, extra in {"lora": [], "qlora_4bit": ["--quantize", "4bit"]}.items():
        out = WORK / f"quant_{name}"
        train_rag(data, index, out, steps=args.train_steps, lr=3e-4, batch_size=2, n_docs=3, save_steps=args.train_steps,
                  warmup=2, logging_steps=1, device=args.device, extra=tuple(extra))
        cost = json.loads((out / "cost_report.json").read_text())
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        curve = [r["loss"] for r in logged if "loss" in r]
        results[f"training{device_tag(args)}_{name}"] = {
            "steps": cost["steps"], "s_per_step": cost["wall_s"] / cost["steps"],
            "peak_cpu_memory_mib": cost["peak_cpu_memory_mib"], "peak_gpu_memory_mib": cost["peak_gpu_memory_mib"],
            "trainable_params": cost["trainable_params"],
            "total_params": cost["total_params"], "loss_curve": curve}
        peak = cost["peak_gpu_memory_mib"] if args.device != "cpu" else cost["peak_cpu_memory_mib"]
        rows.append([name, cost["wall_s"] / cost["steps"], peak, sum(curve[:3]) / 3,
                     sum(curve[-3:]) / 3])
    print_table(f"RAG training, SmolLM2-135M (LoRA r=8) + MiniLM, {args.train_steps} steps of batch 2 — {title}",
                ["run", "s/step", f"peak {'GPU' if args.device != 'cpu' else 'CPU'} MiB", "loss (first 3)", "loss (last 3)"], rows)


if __name__ == "__main__":
    main()
