"""A small RETRO trained for a fixed budget on real text, scored on held-out documents.

Corpus (../shared/data/lm_text): Tiny Shakespeare cut into 200 documents of 200 lines (or, with
--corpus wikitext, the 60 WikiText-2 validation articles); every 10th document is held out. Everything goes
through the CLI as a user would run it:

    ragkit train --arch retro  (the RETRO model; neighbours from other documents only)
    ragkit train --arch retro --retro-cross-attn-layers none   (decoder-only, same steps)
    ragkit train --arch retro --retro-cross-attn-layers none   (decoder-only, as many steps as fit in
                                                                 RETRO's training wall time: equal compute)
    ragkit eval --task lm --data valid/ -m RUN/final           (bits per byte, retrieval on and off)

and a leakage check: RETRO scored on 20 of its training documents, whose own chunks are in the index.

    python benchmarks/retro_quality.py [--corpus shakespeare|wikitext] [--steps 250] [--reuse-runs]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from _common import REPO, hardware, print_table, write_result
from retro_data import shakespeare_blocks, wikitext_articles, write_split

WORK = REPO / "benchmarks" / ".work" / "retro_quality"
MODEL = ["--retro-dim", "256", "--retro-dec-depth", "4", "--retro-enc-depth", "1", "--retro-heads", "4",
         "--retro-dim-head", "64"]
DATA = ["--chunk-size", "64", "--seq-len", "256", "--num-neighbors", "2"]
OPTIM = ["--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "50", "--scheduler", "cosine",
         "--weight-decay", "0.1", "--logging-steps", "25", "--seed", "0", "--device", "cpu"]


def ragkit(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "ragkit.cli", *args], capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"ragkit {' '.join(args[:3])} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def train(name: str, train_dir: Path, steps: int, *extra: str) -> dict:
    run = WORK / name
    shutil.rmtree(run, ignore_errors=True)
    report = json.loads(ragkit("train", "--arch", "retro", "--data", str(train_dir), "--workdir", str(WORK / "workdir"),
                               "-o", str(run), *DATA, *MODEL, *OPTIM, "--max-steps", str(steps),
                               "--save-steps", str(steps), *extra, "--json").strip().splitlines()[-1])
    return {"run": str(run), "steps": steps, **report}


def reuse(name: str) -> dict:
    """A finished run's cost report (with --reuse-runs)."""
    run = WORK / name
    report = json.loads((run / "cost_report.json").read_text())
    return {"run": str(run), **report}


def evaluate(name: str, valid_dir: Path, tag: str = "") -> dict:
    path = WORK / f"{name}{tag}.lm.json"
    ragkit("eval", "--task", "lm", "--data", str(valid_dir), "-m", str(WORK / name / "final"), "--device", "cpu",
           "-o", str(path))
    report = json.loads(path.read_text())
    return {k: v["mean"] for k, v in report["metrics"].items()} | {
        f"{k}_ci95": v["ci95"] for k, v in report["metrics"].items() if k.startswith("bits_per_byte")} | {
        "documents": report["n"], "predicted_tokens": report["config"]["predicted_tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", choices=["shakespeare", "wikitext"], default="shakespeare")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--reuse-runs", action="store_true", help="score the runs already under benchmarks/.work")
    a = parser.parse_args()
    documents = shakespeare_blocks() if a.corpus == "shakespeare" else wikitext_articles()
    train_dir, valid_dir = write_split(documents, WORK / a.corpus)
    if a.reuse_runs:
        runs = {name: reuse(name) for name in ("retro", "decoder_same_steps", "decoder_equal_compute")}
    else:
        runs = {"retro": train("retro", train_dir, a.steps),
                "decoder_same_steps": train("decoder_same_steps", train_dir, a.steps, "--retro-cross-attn-layers", "none")}
        equal = max(1, round(a.steps * runs["retro"]["wall_s"] / runs["decoder_same_steps"]["wall_s"]))
        runs["decoder_equal_compute"] = train("decoder_equal_compute", train_dir, equal, "--retro-cross-attn-layers", "none")
    scores = {name: evaluate(name, valid_dir) for name in runs}
    # Leakage check: 20 training documents, whose own chunks (and their continuations) are in the index. A
    # model that reads its neighbours gains a lot here; the held-out rows above are the honest measure.
    seen = WORK / a.corpus / "seen"
    shutil.rmtree(seen, ignore_errors=True)
    seen.mkdir()
    for path in sorted(train_dir.glob("*.txt"))[:20]:
        shutil.copy(path, seen / path.name)
    leakage = evaluate("retro", seen, tag=".seen")
    rows = []
    for name, run in runs.items():
        s = scores[name]
        rows.append([name, run["total_params"], run["steps"], run["wall_s"], s["bits_per_byte"],
                     s.get("bits_per_byte_no_retrieval", float("nan")), s["perplexity"]])
    print_table("leakage check: RETRO on 20 training documents (their own chunks are neighbours)",
                ["model", "bpb", "bpb, neighbours masked"],
                [["retro", leakage["bits_per_byte"], leakage["bits_per_byte_no_retrieval"]]])
    print_table(f"RETRO quality on {a.corpus}: held-out bits per byte ({scores['retro']['documents']} documents, "
                f"{scores['retro']['predicted_tokens']} tokens)",
                ["model", "params", "steps", "train s", "val bpb", "val bpb, neighbours masked", "val ppl"], rows)
    path = write_result(f"retro_quality_{a.corpus}", {
        "hardware": hardware(), "corpus": a.corpus, "documents": len(documents),
        "split": "every 10th document held out", "config": {"model": MODEL, "data": DATA, "optim": OPTIM},
        "runs": runs, "scores": scores, "leakage_check_on_training_documents": leakage,
        "note": "val bpb for retro uses its neighbours from the training documents; 'masked' is the same model "
                "with retrieved=None; decoder-only models have no neighbours",
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
