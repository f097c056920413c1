"""Closed-book vs retrieve-then-read on the real evaluation sets in ../shared/data, through the CLI.

SmolLM2-135M-Instruct (shipped GGUF) reads; all-MiniLM-L6-v2 retrieves. Every run is a
`ragkit eval --model ...` call writing a JSON report under benchmarks/results/qa/; the summary table
(mean and 95% interval of each task's primary metric) is printed and written to
benchmarks/results/qa_real_data.json.

    python benchmarks/qa_real_data.py [--quick]     # --quick: 20 questions per run, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO, RESULTS, SHARED_DATA, hardware, print_table, write_result

RAGKIT = str(Path(sys.executable).parent / "ragkit")
WORK = REPO / "benchmarks" / ".work"


def sh(*args: str) -> None:
    began = time.perf_counter()
    subprocess.run([RAGKIT, *args], check=True)
    print(f"  ({time.perf_counter() - began:.0f}s) ragkit {' '.join(args)}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated run names")
    args = parser.parse_args()
    out = RESULTS / "qa"
    out.mkdir(parents=True, exist_ok=True)
    popqa100 = SHARED_DATA / "popqa" / "popqa_longtail_w_gs.first100.jsonl"
    arc100 = SHARED_DATA / "arc_challenge" / "arc_challenge_processed.first100.jsonl"
    wiki_idx, scifact_idx = WORK / "wiki_idx", WORK / "scifact_idx"
    limit = ["--limit", "20"] if args.quick else []  # with --quick this later --limit wins

    runs = {
        "popqa100_closed": ["--task", "popqa", "--data", popqa100],
        "popqa100_rag_ctxs": ["--task", "popqa", "--data", popqa100, "--arch", "rag", "--passages", "ctxs", "--k", "5"],
        "popqa100_rag_index": ["--task", "popqa", "--data", popqa100, "--arch", "rag", "--index", wiki_idx, "--k", "5"],
        "popqa_longtail_closed": ["--task", "popqa", "--data", SHARED_DATA / "popqa" / "popqa_longtail.jsonl"],
        "arc100_closed": ["--task", "arc_c", "--data", arc100],
        "arc100_rag_ctxs": ["--task", "arc_c", "--data", arc100, "--arch", "rag", "--passages", "ctxs", "--k", "5"],
        "arc_full_closed": ["--task", "arc_c", "--data", SHARED_DATA / "arc_challenge" / "arc_challenge_test.jsonl"],
        "nq_dev_closed": ["--task", "nq", "--data", SHARED_DATA / "nq_open" / "NQ-open.dev.jsonl"],
        "scifact_closed": ["--task", "scifact", "--data", SHARED_DATA / "scifact_claims" / "claims_dev.jsonl"],
        "scifact_rag_index": ["--task", "scifact", "--data", SHARED_DATA / "scifact_claims" / "claims_dev.jsonl",
                              "--arch", "rag", "--index", scifact_idx, "--k", "3"],
    }
    chosen = [r for r in runs if not args.only or r in args.only.split(",")]
    needs = {str(a) for r in chosen for a in runs[r]}
    if str(wiki_idx) in needs and not (wiki_idx / "current").exists():
        sh("index", "build", str(SHARED_DATA / "wiki_passages" / "selfrag_ctx_passages.jsonl"), "-o", str(wiki_idx), "--overwrite")
    if str(scifact_idx) in needs and not (scifact_idx / "current").exists():
        sh("index", "build", str(SHARED_DATA / "beir_scifact"), "-o", str(scifact_idx), "--overwrite")

    for name in chosen:
        sh("eval", *map(str, runs[name]), "--model", "smollm2-135m", "--max-new-tokens", "32", "--label", name,
           "-o", str(out / f"{name}.json"), *limit)
    summary, rows = {}, []
    for name in runs:  # every report present, including those of earlier invocations
        report = out / f"{name}.json"
        if not report.exists():
            continue
        r = json.loads(report.read_text())
        p = r["primary_metric"]
        m = r["metrics"][p]
        summary[name] = {"task": r["task"], "n": r["n"], "primary": p, "mean": m["mean"], "ci95": m["ci95"],
                         "metrics": {k: v["mean"] for k, v in r["metrics"].items()}, "seconds": r["timings"]["total_s"]}
        rows.append([name, r["task"], r["n"], p, m["mean"], f"[{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]",
                     r["timings"]["total_s"]])
    hw = hardware()
    print_table(f"SmolLM2-135M-Instruct + MiniLM — {hw['cpu']}, {hw['cores']} cores",
                ["run", "task", "n", "metric", "mean", "95% CI", "seconds"], rows)
    path = write_result("qa_real_data" + ("_quick" if args.quick else ""), {"hardware": hw, "runs": summary})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
