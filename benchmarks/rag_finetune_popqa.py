"""A real RAG fine-tuning run on CPU: SmolLM2-135M (LoRA) + MiniLM over the wiki_passages index.

Data: PopQA questions whose answers the `wiki_passages/` corpus holds. The 100 Self-RAG PopQA rows are
split by id (hash) into train and dev; more training questions come from `popqa/popqa.jsonl` when a
corpus passage titled with the question's subject contains an answer. Before and after training:
dev match / EM of the reader, and answer recall@k of the retriever (a retrieved passage contains an
answer); closed-book SmolLM2 is the baseline. A learning curve comes from the checkpoints saved every
--eval-every steps, each scored with the same decoding; step 0 is the same model before any update (one
step at learning rate 0: LoRA's B matrices start at zero, so the generator is the base model). Ends with
the trainer's cost report.

    python benchmarks/rag_finetune_popqa.py [--steps 300] [--batch-size 2] [--eval-every 100] [--n-docs 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO, SHARED_DATA, hardware, print_table, write_result

RAGKIT = str(Path(sys.executable).parent / "ragkit")
WORK = REPO / "benchmarks" / ".work" / "rag_finetune"


def is_dev(qid: str) -> bool:
    return int(hashlib.sha1(qid.encode()).hexdigest(), 16) % 10 < 3  # ~30%


def build_data() -> tuple[list[dict], list[dict]]:
    corpus = [json.loads(line) for line in (SHARED_DATA / "wiki_passages" / "selfrag_ctx_passages.jsonl").open()]
    by_title: dict[str, list[str]] = {}
    for p in corpus:
        by_title.setdefault(p["title"], []).append(p["text"])
    first100 = [json.loads(line) for line in (SHARED_DATA / "popqa" / "popqa_longtail_w_gs.first100.jsonl").open()]
    dev = [{"id": str(r["id"]), "question": r["question"], "answers": r["answers"]} for r in first100 if is_dev(str(r["id"]))]
    train = [{"id": str(r["id"]), "question": r["question"], "answers": r["answers"]} for r in first100 if not is_dev(str(r["id"]))]
    held = {r["id"] for r in dev} | {r["id"] for r in train}
    for line in (SHARED_DATA / "popqa" / "popqa.jsonl").open():
        r = json.loads(line)
        if str(r["id"]) in held or is_dev(str(r["id"])):
            continue
        texts = by_title.get(r["s_wiki_title"], [])
        found = [a for a in r["answers"] if len(a) >= 4 and any(a in t for t in texts)]
        if found:  # train on the alias the corpus actually states
            train.append({"id": str(r["id"]), "question": r["question"], "answers": [found[0]]})
    return train, dev


def sh(*args: str, stdout: Path | None = None) -> float:
    began = time.perf_counter()
    with open(stdout, "w") if stdout else open("/dev/null", "w") as out:
        subprocess.run([RAGKIT, *args], check=True, stdout=out if stdout else None)
    return time.perf_counter() - began


def wiki_index() -> Path:
    """The MiniLM index over wiki_passages/, built once and shared with the other benchmarks."""
    index = REPO / "benchmarks" / ".work" / "wiki_idx"
    if not (index / "current").exists():
        sh("index", "build", str(SHARED_DATA / "wiki_passages" / "selfrag_ctx_passages.jsonl"), "-o", str(index))
    return index


def train_rag(data: Path, index: Path, out: Path, *, steps: int, lr: float, batch_size: int, n_docs: int,
              save_steps: int, warmup: int, logging_steps: int, device: str = "cpu", extra: tuple[str, ...] = ()) -> float:
    """`ragkit train --arch rag` as these benchmarks run it: SmolLM2-135M with LoRA r=8 + MiniLM, passages cut
    to 60 words, every checkpoint kept; a fresh OUTPUT; returns the wall seconds."""
    shutil.rmtree(out, ignore_errors=True)
    return sh("train", "--arch", "rag", "--data", str(data), "--index", str(index), "-o", str(out),
              "--generator", "smollm2-135m", "--n-docs", str(n_docs), "--lora-r", "8", "--lora-alpha", "16",
              "--batch-size", str(batch_size), "--grad-accum", "1", "--lr", str(lr), "--max-steps", str(steps),
              "--warmup-steps", str(warmup), "--save-steps", str(save_steps),
              "--save-total-limit", str(steps // save_steps + 1), "--logging-steps", str(logging_steps),
              "--max-passage-words", "60", "--device", device, "--seed", "0", *extra)


def answer_recall(encoder_path: str, index: Path, dev: list[dict], k: int) -> float:
    from sentence_transformers import SentenceTransformer

    from ragkit.index import Index

    enc = SentenceTransformer(encoder_path, device="cpu")
    idx = Index.open(index)
    hits = idx.search(enc.encode([r["question"] for r in dev], normalize_embeddings=True), k)
    ok = [any(a.lower() in (h.title + " " + h.text).lower() for h in row for a in r["answers"]) for r, row in zip(dev, hits)]
    return sum(ok) / len(ok)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=100, help="score a checkpoint every N steps")
    parser.add_argument("--n-docs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--note", default="", help="circumstances of the run for docs/results.md (e.g. other load)")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    train, dev = build_data()
    (WORK / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (WORK / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))
    index = wiki_index()
    from ragkit.models.registry import resolve

    minilm = resolve("minilm").location
    recall_before = answer_recall(minilm, index, dev, args.n_docs)
    runs = {}
    for name, extra in {
        "closed_book": [],
        "rag_untrained": ["--arch", "rag", "--index", str(index), "--k", str(args.n_docs)],
    }.items():
        report = WORK / f"{name}.json"
        if not report.exists():  # baselines do not depend on training: reuse a finished one
            sh("eval", "--task", "popqa", "--data", str(WORK / "dev.jsonl"), "--model", "smollm2-135m", *extra,
               "--max-new-tokens", "24", "-o", str(report))
        runs[name] = json.loads(report.read_text())["metrics"]
    def train_run(run_dir: Path, steps: int, lr: float, save_steps: int) -> float:
        return train_rag(WORK / "train.jsonl", index, run_dir, steps=steps, lr=lr, batch_size=args.batch_size,
                         n_docs=args.n_docs, save_steps=save_steps, warmup=4, logging_steps=5)

    def score(name: str, checkpoint: Path) -> None:
        report = WORK / f"{name}.json"
        sh("eval", "--task", "popqa", "--data", str(WORK / "dev.jsonl"), "--model", str(checkpoint), "--arch", "rag",
           "--max-new-tokens", "24", "-o", str(report))
        runs[name] = json.loads(report.read_text())["metrics"]
        recalls[name] = answer_recall(str(checkpoint / "query_encoder"), index, dev, args.n_docs)

    recalls: dict[str, float] = {"closed_book": float("nan"), "rag_untrained": recall_before}
    train_run(WORK / "run0", 1, 0.0, 1)  # the untrained RAG model, saved in the trained models' format
    score("rag_step_0", WORK / "run0" / "final")
    run_dir = WORK / "run"
    train_s = train_run(run_dir, args.steps, args.lr, args.eval_every)
    for step in range(args.eval_every, args.steps, args.eval_every):
        score(f"rag_step_{step}", run_dir / f"checkpoint-{step}")
    score(f"rag_step_{args.steps}", run_dir / "final")
    recall_after = recalls[f"rag_step_{args.steps}"]
    cost = json.loads((run_dir / "cost_report.json").read_text())
    losses = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in losses if "loss" in r]
    hw = hardware()
    rows = [[name, m["match"]["mean"], f"[{m['match']['ci95'][0]:.3f}, {m['match']['ci95'][1]:.3f}]", m["em"]["mean"],
             m["f1"]["mean"], recalls[name], m["match"]["n"]] for name, m in runs.items()]
    print_table(f"PopQA dev ({len(dev)} q), train {len(train)} q, {args.steps} steps of batch {args.batch_size} — "
                f"{hw['cpu']}, {hw['cores']} cores", ["run", "match", "95% CI", "EM", "F1", f"recall@{args.n_docs}", "n"], rows)
    print(f"retriever answer recall@{args.n_docs}: {recall_before:.3f} before, {recall_after:.3f} after")
    path = write_result("rag_finetune_popqa", {
        "hardware": hw, "train_questions": len(train), "dev_questions": len(dev), "steps": args.steps,
        "batch_size": args.batch_size, "eval_every": args.eval_every, "n_docs": args.n_docs, "lr": args.lr, "train_wall_s": train_s,
        "runs": {n: {k: v["mean"] for k, v in m.items()} | {"match_ci95": m["match"]["ci95"]} for n, m in runs.items()},
        "answer_recall_before": recall_before, "answer_recall_after": recall_after,
        "answer_recall": recalls, "cost_report": cost,
        "loss_curve": losses, **({"note": args.note} if args.note else {}),
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
