"""Pruning and distillation's quality/size/speed trade-off on CPU: smaller Self-RAG generators cut from a larger
one (`ragkit prune --keep-every N`) learn from it with and without its logits (`ragkit train --arch selfrag
--distill-from TEACHER`), beside the teacher magnitude-pruned (`ragkit prune --sparsity S`, untrained).

Teacher: the Self-RAG generator of benchmarks/selfrag_small_run.py (SmolLM2-135M + LoRA, merged; run that
first with --work benchmarks/.work/selfrag_v2). Data: its critic-labelled PopQA generator set, split by id into train and held out (the teacher was
trained on all of it, so its own held-out numbers are optimistic; the students' are not). Students: the
teacher with every 2nd or every 3rd decoder layer kept (15 or 10 of 30, DistilBERT-style initialisation),
each fully fine-tuned for the same steps on the train split, once on the labels alone and once with
`--distill-from` (alpha 0.5, T 2). Scored on the held-out split: label loss (nats per output token, the
paragraph contents masked as in training), KL(teacher || model) over the same tokens, reflection-token
accuracy (the first output token, [Retrieval] or [No Retrieval], and every later reflection token the
labels hold, read greedily under teacher forcing), parameters (all and non-zero), safetensors size on disk and
CPU forward tokens/s.

    python benchmarks/distill_tradeoff.py [--steps 100]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO, hardware, print_table, write_result

SOURCE = REPO / "benchmarks" / ".work" / "selfrag_v2"
WORK = REPO / "benchmarks" / ".work" / "distill"
KEEP = {"student-15": 2, "student-10": 3}  # every n-th layer kept (ragkit prune --keep-every)
SPARSITY = {"teacher 30% magnitude-pruned": 0.3, "teacher 50% magnitude-pruned": 0.5}  # ragkit prune --sparsity


def split() -> tuple[Path, Path]:
    rows = [json.loads(line) for line in (SOURCE / "generator_train.jsonl").read_text().splitlines() if line.strip()]
    held = [r for r in rows if int(hashlib.sha1(str(r["id"]).encode()).hexdigest(), 16) % 10 == 0]
    train = [r for r in rows if r not in held]
    WORK.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("heldout", held)):
        (WORK / f"{name}.jsonl").write_text("".join(json.dumps({"instruction": r["instruction"], "output": r["output"]}) + "\n"
                                                    for r in part))
    return WORK / "train.jsonl", WORK / "heldout.jsonl"


def teacher_folder() -> Path:
    """The teacher merged into a plain folder (the students are cut from it)."""
    import torch

    from ragkit.archs.selfrag.loading import load_causal_lm

    target = WORK / "teacher"
    if not (target / "config.json").exists():
        model, tokenizer = load_causal_lm(str(SOURCE / "generator" / "final"), device="cpu", dtype="float32",
                                          merge_lora=True)
        model.to(torch.float32).save_pretrained(target)
        tokenizer.save_pretrained(target)
    return target


def prune(teacher: Path, name: str, *flags: str) -> Path:
    """`ragkit prune` of the teacher: structured (--keep-every N, a student) or magnitude (--sparsity S)."""
    target = WORK / name
    if (target / "config.json").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    done = subprocess.run([sys.executable, "-m", "ragkit.cli", "prune", str(teacher), "-o", str(target), *flags],
                          capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"ragkit prune {' '.join(flags)} failed:\n{done.stderr[-3000:]}")
    return target


def train(student: Path, data: Path, name: str, steps: int, teacher: Path | None) -> dict:
    out = WORK / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "ragkit.cli", "train", "--arch", "selfrag", "--data", str(data), "--generator",
           str(student), "-o", str(out), "--lora-r", "0", "--max-steps", str(steps), "--batch-size", "4",
           "--lr", "1e-4", "--warmup-steps", "10", "--max-seq-length", "384", "--save-steps", str(steps),
           "--logging-steps", "10", "--seed", "0", "--device", "cpu", "--json"]
    if teacher is not None:
        cmd += ["--distill-from", str(teacher), "--distill-alpha", "0.5", "--distill-temperature", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"training {name} failed:\n{done.stderr[-3000:]}")
    return {"folder": str(out / "final" / "model"), **json.loads(done.stdout.strip().splitlines()[-1])}


def score(folder: Path | str, teacher_model, heldout: Path) -> dict:
    """Held-out label loss, KL to the teacher, reflection-token accuracy, size and CPU speed."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragkit.archs.selfrag.tokens import REFLECTION_TOKENS
    from ragkit.archs.selfrag.data import collate, encode, read_instruction_data

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reflection = set(tokenizer.convert_tokens_to_ids(list(REFLECTION_TOKENS)))
    rows = [encode(e, tokenizer, critic=False, max_length=384) for e in read_instruction_data(heldout)]
    nll = kl = 0.0
    tokens = right = asked = 0
    seconds = 0.0
    seen = 0
    with torch.no_grad():
        for start in range(0, len(rows), 4):
            batch = collate(rows[start:start + 4], tokenizer.pad_token_id)
            began = time.perf_counter()
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            seconds += time.perf_counter() - began
            seen += int(batch["attention_mask"].sum())
            labels = batch["labels"][:, 1:]
            mask = labels.ne(-100)
            nll += float(F.cross_entropy(logits[mask], labels[mask], reduction="sum"))
            tokens += int(mask.sum())
            teacher_logits = teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            kl += float(F.kl_div(torch.log_softmax(logits[mask], -1), torch.log_softmax(teacher_logits[mask], -1),
                                 log_target=True, reduction="sum"))
            is_reflection = mask & torch.isin(labels, torch.tensor(sorted(reflection)))
            asked += int(is_reflection.sum())
            right += int((logits.argmax(-1).eq(labels) & is_reflection).sum())
    disk = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    return {"params": sum(p.numel() for p in model.parameters()), "layers": model.config.num_hidden_layers,
            "nonzero_params": sum(int(p.count_nonzero()) for p in model.parameters()), "disk_bytes": disk,
            "label_loss": nll / tokens, "label_ppl": math.exp(nll / tokens), "kl_to_teacher": kl / tokens,
            "reflection_accuracy": right / asked, "reflection_tokens": asked, "heldout_examples": len(rows),
            "forward_tokens_per_s": seen / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    a = parser.parse_args()
    if not (SOURCE / "generator" / "final").exists():
        raise SystemExit(f"{SOURCE}/generator is missing: run benchmarks/selfrag_small_run.py --work {SOURCE} first "
                         "(the teacher)")
    import torch
    from transformers import AutoModelForCausalLM

    train_file, heldout = split()
    teacher = teacher_folder()
    students = {name: prune(teacher, name, "--keep-every", str(every)) for name, every in KEEP.items()}
    sparse = {name: prune(teacher, f"sparse-{int(100 * x)}", "--sparsity", str(x)) for name, x in SPARSITY.items()}
    runs: dict[str, dict] = {}
    for name, folder in students.items():
        runs[f"{name} labels only"] = train(folder, train_file, f"{name}-ce", a.steps, None)
        runs[f"{name} + distillation"] = train(folder, train_file, f"{name}-kd", a.steps, teacher)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    scores = {"teacher (135M, 30 layers)": score(teacher, teacher_model, heldout)}
    for name, folder in sparse.items():
        scores[f"{name} (untrained)"] = score(folder, teacher_model, heldout)
    for name, folder in students.items():
        scores[f"{name} untrained (cut from the teacher)"] = score(folder, teacher_model, heldout)
    for name, run in runs.items():
        scores[name] = score(run["folder"], teacher_model, heldout)
    rows = [[name, s["params"] / 1e6, s["nonzero_params"] / 1e6, s["disk_bytes"] / 2**20, s["layers"], s["label_loss"],
             s["kl_to_teacher"], s["reflection_accuracy"], s["forward_tokens_per_s"],
             runs.get(name, {}).get("wall_s", 0.0)] for name, s in scores.items()]
    n = next(iter(scores.values()))
    print_table(f"distillation trade-off: {n['heldout_examples']} held-out examples, {n['reflection_tokens']} "
                f"reflection tokens, {a.steps} steps per student",
                ["model", "params (M)", "nonzero (M)", "disk (MiB)", "layers", "label loss", "KL to teacher",
                 "reflection acc", "fwd tok/s", "train s"], rows)
    path = write_result("distill_tradeoff", {"hardware": hardware(), "steps": a.steps, "scores": scores, "runs": runs,
                                             "note": "the teacher saw the held-out examples in its own training; "
                                                     "magnitude pruning keeps shapes (same disk, same dense speed)"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
