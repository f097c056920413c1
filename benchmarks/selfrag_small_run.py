"""A real, small Self-RAG run on CPU: critic -> critic-labelled generator data -> generator -> PopQA.

No released Self-RAG training data is reachable here, so the critic set is built from real annotations:
  * relevance and support: SciFact train claims with their annotated evidence abstracts ([Relevant]; SUPPORT ->
    [Fully supported], CONTRADICT -> [No support / Contradictory]) and random abstracts ([Irrelevant]);
  * retrieval need: PopQA long-tail questions outside the evaluation rows, [No Retrieval] where closed-book
    SmolLM2 already answers correctly (benchmarks/results/qa/popqa_longtail_closed.json), else [Retrieval];
  * utility: a PopQA question with its gold answer ([Utility:5]) or another question's answer ([Utility:1]).
The critic (SmolLM2-135M + LoRA) is scored on a held-out tenth of that set. It then labels generator data
(PopQA questions -> gold answers, passages from the ragkit index over wiki_passages), the generator is trained
with LoRA, and PopQA rows 51-100 of popqa_longtail_w_gs (their released ctxs) are answered in the three modes.

Every stage caches under benchmarks/.work/selfrag/ (delete it to start again).

    python benchmarks/selfrag_small_run.py [--critic-steps 100] [--generator-steps 120]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from _common import SHARED_DATA, hardware, print_table, write_result

ROOT = Path(__file__).resolve().parent
WORK = ROOT / ".work" / "selfrag"
RAGKIT = [sys.executable, "-m", "ragkit.cli"]


def run(args: list[str], stdout: Path | None = None) -> float:
    began = time.perf_counter()
    with open(stdout, "w") if stdout else open("/dev/null", "w") as out:
        subprocess.run(RAGKIT + args, check=True, stdout=out)
    return time.perf_counter() - began


def critic_data(seed: int = 0) -> tuple[list[dict], list[dict]]:
    from ragkit.archs.selfrag.critic import critic_example

    rng = random.Random(seed)
    corpus = {}
    for line in (SHARED_DATA / "beir_scifact" / "corpus.jsonl").open():
        d = json.loads(line)
        corpus[d["_id"]] = f"{d.get('title', '')}\n{' '.join(d['text'].split()[:80])}"
    doc_ids = sorted(corpus)
    examples = []
    claims = [json.loads(line) for line in (SHARED_DATA / "scifact_claims" / "claims_train.jsonl").open()]
    rng.shuffle(claims)
    for c in claims[:160]:
        for doc, notes in list(c["evidence"].items())[:1]:
            if doc not in corpus:
                continue
            ev = corpus[doc]
            examples.append(("relevance", critic_example("relevance", instruction=c["claim"], evidence=ev), "[Relevant]"))
            label = {"SUPPORT": "[Fully supported]", "CONTRADICT": "[No support / Contradictory]"}[notes[0]["label"]]
            examples.append(("groundness", critic_example("groundness", instruction="Is the following statement correct?",
                                                          output=c["claim"], evidence=ev), label))
        other = rng.choice(doc_ids)
        if str(other) not in c["evidence"]:
            examples.append(("relevance", critic_example("relevance", instruction=c["claim"], evidence=corpus[other]),
                             "[Irrelevant]"))
    eval_ids = {json.loads(line)["id"] for line in (SHARED_DATA / "popqa" / "popqa_longtail_w_gs.first100.jsonl").open()}
    closed = json.loads((ROOT / "results" / "qa" / "popqa_longtail_closed.json").read_text())["rows"]
    pool = [r for r in closed if int(r["id"]) not in eval_ids]
    right = [r for r in pool if r["metrics"]["match"] == 1.0]
    wrong = [r for r in pool if r["metrics"]["match"] == 0.0]
    rng.shuffle(wrong)
    for r, token in [(r, "[No Retrieval]") for r in right[:120]] + [(r, "[Retrieval]") for r in wrong[:120]]:
        examples.append(("retrieval", critic_example("retrieval", instruction=r["question"]), token))
    rng.shuffle(pool)
    for i, r in enumerate(pool[:200]):
        answer = r["golds"][0] if i % 2 == 0 else pool[(i + 7) % len(pool)]["golds"][0]
        examples.append(("utility", critic_example("utility", instruction=r["question"], output=answer),
                         "[Utility:5]" if i % 2 == 0 else "[Utility:1]"))
    rng.shuffle(examples)
    rows = [{"instruction": ins, "input": inp, "output": out, "task": task} for task, (ins, inp), out in examples]
    cut = len(rows) // 10
    return rows[cut:], rows[:cut]


def critic_accuracy(critic_dir: Path, held_out: list[dict]) -> dict[str, dict[str, float]]:
    from ragkit.archs.selfrag.critic import TASKS, Critic
    from ragkit.archs.selfrag.loading import load_causal_lm

    model, tok = load_causal_lm(str(critic_dir), device="cpu", merge_lora=True)
    critic = Critic(model, tok, batch_size=8)
    out = {}
    for task in TASKS:
        rows = [r for r in held_out if r["task"] == task]
        if not rows:
            continue
        judged = critic.judge(task, [(r["instruction"], r["input"]) for r in rows])
        majority = max({r["output"] for r in rows}, key=lambda t: sum(r["output"] == t for r in rows))
        out[task] = {"n": len(rows), "accuracy": sum(j.token == r["output"] for j, r in zip(judged, rows)) / len(rows),
                     "majority_baseline": sum(r["output"] == majority for r in rows) / len(rows)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--critic-steps", type=int, default=100)
    parser.add_argument("--generator-steps", type=int, default=120)
    parser.add_argument("--ndocs", type=int, default=5)
    parser.add_argument("--critic-lr", type=float, default=1e-3)
    parser.add_argument("--work", type=Path, default=WORK, help="cache folder (a new one starts from scratch)")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    base = ["--device", "cpu", "--max-seq-length", "448", "--batch-size", "4", "--logging-steps", "10"]

    train, held_out = critic_data()
    (work / "critic_train.json").write_text(json.dumps(train))
    critic_run = work / "critic"
    if not (critic_run / "final").exists():
        timings["critic_train_s"] = run(["train", "--arch", "selfrag-critic", "--data", str(work / "critic_train.json"),
                                         "-o", str(critic_run), "--max-steps", str(args.critic_steps),
                                         "--save-steps", str(args.critic_steps), "--lr", str(args.critic_lr), *base])
    critic_scores = critic_accuracy(critic_run / "final", held_out)

    idx = ROOT / ".work" / "wiki_idx"
    if not idx.exists():
        run(["index", "build", str(SHARED_DATA / "wiki_passages" / "selfrag_ctx_passages.jsonl"), "-o", str(idx),
             "--device", "cpu"])
    first100 = [json.loads(line) for line in (SHARED_DATA / "popqa" / "popqa_longtail_w_gs.first100.jsonl").open()]
    eval_rows, train_rows = first100[50:], first100[:50]
    eval_ids = {r["id"] for r in first100}
    extra = [json.loads(line) for line in (SHARED_DATA / "popqa" / "popqa_longtail.jsonl").open()]
    extra = [r for r in extra if r["id"] not in eval_ids][:150]
    plain = work / "generator_plain.jsonl"
    plain.write_text("".join(json.dumps({"id": r["id"], "instruction": r["question"], "output": r["answers"][0]}) + "\n"
                             for r in train_rows + extra))
    labelled = work / "generator_train.jsonl"
    if not labelled.exists():
        timings["label_s"] = run(["selfrag", "label", str(plain), "--critic", str(critic_run / "final"), "--index",
                                  str(idx), "--ndocs", "3", "--device", "cpu"], stdout=labelled)
    labels = [json.loads(line)["critic"] for line in labelled.open()]
    gen_run = work / "generator"
    if not (gen_run / "final").exists():
        timings["generator_train_s"] = run(["train", "--arch", "selfrag", "--data", str(labelled), "-o", str(gen_run),
                                            "--max-steps", str(args.generator_steps),
                                            "--save-steps", str(args.generator_steps), "--lr", "3e-4", *base])
    eval_file = work / "popqa_eval50.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    modes = {}
    for mode in ("no_retrieval", "adaptive_retrieval", "always_retrieve"):
        report = work / f"popqa50_{mode}.json"
        seconds = run(["eval", "--task", "popqa", "--data", str(eval_file), "-m", str(gen_run / "final"),
                       "--arch", "selfrag", "--mode", mode, "--k", str(args.ndocs), "--max-new-tokens", "16",
                       "--device", "cpu", "-o", str(report)])
        metrics = json.loads(report.read_text())["metrics"]
        modes[mode] = {"match": metrics["match"], "retrieved": metrics.get("retrieved"), "seconds": seconds}

    # the answer-prior baseline: the most common training answer of the question's PopQA relation
    priors: dict[str, dict[str, int]] = {}
    for r in train_rows + extra:
        counts = priors.setdefault(r["prop"], {})
        counts[r["answers"][0]] = counts.get(r["answers"][0], 0) + 1
    prior_hits = sum(any(a in max(priors.get(r["prop"], {"": 0}).items(), key=lambda kv: kv[1])[0] for a in r["answers"])
                     for r in eval_rows)
    prior_match = prior_hits / len(eval_rows)

    hw = hardware()
    print(f"relation-majority answer baseline (no model): match {prior_match:.3f}")
    print_table("critic (SmolLM2-135M + LoRA) on its held-out tenth", ["task", "n", "accuracy", "majority class"],
                [[t, v["n"], v["accuracy"], v["majority_baseline"]] for t, v in critic_scores.items()])
    print_table(f"Self-RAG generator (SmolLM2-135M + LoRA), PopQA long-tail rows 51-100, released ctxs, "
                f"ndocs {args.ndocs} — {hw['cpu']}, {hw['cores']} cores",
                ["mode", "match", "95% CI", "retrieval rate", "seconds"],
                [[m, v["match"]["mean"], f"{v['match']['ci95'][0]:.2f}-{v['match']['ci95'][1]:.2f}",
                  v["retrieved"]["mean"] if v["retrieved"] else "-", v["seconds"]] for m, v in modes.items()])
    payload = {"hardware": hw, "critic_train_examples": len(train), "critic_held_out": critic_scores,
               "generator_train_examples": len(labels),
               "label_counts": {k: sum(1 for lab in labels if lab.get("retrieval") == k) for k in ("[Retrieval]", "[No Retrieval]")},
               "relevant_labels": sum(1 for lab in labels if lab.get("relevance") == "[Relevant]"),
               "critic_steps": args.critic_steps, "critic_lr": args.critic_lr, "generator_steps": args.generator_steps, "ndocs": args.ndocs,
               "modes": modes, "timings": timings, "relation_majority_baseline_match": prior_match}
    print(f"wrote {write_result('selfrag_small_run', payload)}")


if __name__ == "__main__":
    main()
