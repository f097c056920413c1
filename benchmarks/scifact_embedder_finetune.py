"""`ragkit train --arch embedder` on BEIR SciFact: all-MiniLM-L6-v2 fine-tuned on the train qrels (MNRL with
hard negatives mined from the ragkit index), then `ragkit index refresh` re-embeds the corpus; nDCG@10 on
the test queries before and after, beside the published MiniLM number, with the run's time and memory.

    python benchmarks/scifact_embedder_finetune.py [--epochs 1] [--hard-negatives 1] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import SHARED_DATA, hardware, print_table, write_result
from scifact_index_quality import load_scifact

ROOT = Path(__file__).resolve().parent
WORK = ROOT / ".work" / "embedder"
RAGKIT = [sys.executable, "-m", "ragkit.cli"]


def ndcg(index_dir: Path) -> dict[str, float]:
    from ragkit.eval.retrieval_metrics import evaluate_run
    from ragkit.retrieval import Retriever

    _, queries, qrels = load_scifact(SHARED_DATA / "beir_scifact")
    qids = list(queries)
    hits = Retriever(index_dir, device="cpu").retrieve([queries[q] for q in qids], 100)
    return evaluate_run({q: [h.id for h in row] for q, row in zip(qids, hits)}, qrels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--hard-negatives", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-5)
    args = parser.parse_args()
    data = SHARED_DATA / "beir_scifact"
    WORK.mkdir(parents=True, exist_ok=True)
    base_idx = WORK / "idx_base"
    if not base_idx.exists():
        subprocess.run(RAGKIT + ["index", "build", str(data / "corpus.jsonl"), "-o", str(base_idx), "--device", "cpu"],
                       check=True, stdout=subprocess.DEVNULL)
    before = ndcg(base_idx)
    run_dir = WORK / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    began = time.perf_counter()
    subprocess.run(RAGKIT + ["train", "--arch", "embedder", "--data", str(data), "--index", str(base_idx),
                             "--hard-negatives", str(args.hard_negatives), "-o", str(run_dir), "--epochs", str(args.epochs),
                             "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup-steps", "3",
                             "--save-steps", "100000", "--device", "cpu"], check=True, stdout=subprocess.DEVNULL)
    train_s = time.perf_counter() - began
    cost = json.loads((run_dir / "cost_report.json").read_text())
    tuned_idx = WORK / "idx_tuned"
    shutil.rmtree(tuned_idx, ignore_errors=True)
    shutil.copytree(base_idx, tuned_idx, symlinks=True)
    began = time.perf_counter()
    subprocess.run(RAGKIT + ["index", "refresh", str(tuned_idx), "--model", str(run_dir / "final" / "embedder"),
                             "--device", "cpu"], check=True, stdout=subprocess.DEVNULL)
    refresh_s = time.perf_counter() - began
    after = ndcg(tuned_idx)
    hw = hardware()
    print_table(f"SciFact test, all-MiniLM-L6-v2 before/after `train --arch embedder` (train qrels, MNRL + "
                f"{args.hard_negatives} hard negative(s), {args.epochs:g} epoch(s), batch {args.batch_size}) — "
                f"{hw['cpu']}, {hw['cores']} cores",
                ["embedder", "nDCG@10", "R@100", "MRR@10"],
                [["published all-MiniLM-L6-v2 (MTEB)", 0.64508, 0.925, "-"],
                 ["all-MiniLM-L6-v2 (ragkit index, flat)", before["ndcg@10"], before["recall@100"], before["mrr@10"]],
                 ["fine-tuned (ragkit index refresh)", after["ndcg@10"], after["recall@100"], after["mrr@10"]]])
    gain = 100 * (after["ndcg@10"] - before["ndcg@10"])
    print(f"nDCG@10 {gain:+.2f} points; training {train_s:.0f}s ({cost['steps']} steps, peak RSS "
          f"{cost['peak_cpu_memory_mib']:.0f} MiB), refresh {refresh_s:.0f}s")
    print(f"wrote {write_result('scifact_embedder_finetune', {'hardware': hw, 'args': vars(args), 'before': before, 'after': after, 'gain_points': gain, 'train_s': train_s, 'refresh_s': refresh_s, 'cost_report': cost})}")


if __name__ == "__main__":
    main()
