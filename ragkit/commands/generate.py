"""`ragkit generate`: questions in (JSONL or plain lines), answers out (JSONL)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ragkit.commands._common import BatchOpt, DenseWeightOpt, DeviceOpt, FusionOpt, RetrievalModeOpt, handle_errors, mode_from_flags

ModelGen = Annotated[str, typer.Option("--model", "-m", help="Generator: hub id, local folder, .gguf file, alias (smollm2-135m = shipped SmolLM2-135M-Instruct), or a `ragkit train --arch rag` checkpoint.")]
ArchOpt = Annotated[str, typer.Option("--arch", help="none (closed book), rag (retrieve with --index, or use the input's ctxs, then read), selfrag (a model with Self-RAG reflection tokens; see the --mode options) or retro (a `ragkit train --arch retro` checkpoint continuing each prompt).")]
WorkdirOpt = Annotated[Path | None, typer.Option("--workdir", help="RETRO: the work folder whose index and chunks the model retrieves from (default: the one it was trained with).")]
NoRetrievalOpt = Annotated[bool, typer.Option("--no-retrieval", help="RETRO: run the decoder without neighbours.")]
IndexOpt = Annotated[Path | None, typer.Option("--index", help="ragkit index to retrieve from (--arch rag).")]
KOpt = Annotated[int, typer.Option("--k", "-k", min=1, help="Passages per question.")]
PassagesOpt = Annotated[str, typer.Option("--passages", help="Where passages come from: auto (index if given, else the input's own), index, ctxs or hits (the input's own: Self-RAG files carry ctxs, `ragkit index search` output carries hits; either field is read).")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens to generate per answer.")]
SampleOpt = Annotated[bool, typer.Option("--do-sample/--greedy", help="Sample (with --temperature/--top-p/--top-k) or decode greedily.")]
TempOpt = Annotated[float, typer.Option("--temperature", min=0.0, help="Sampling temperature.")]
TopPOpt = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")]
TopKOpt = Annotated[int, typer.Option("--top-k", min=0, help="Sample from the k most likely tokens (0 = off).")]
StopOpt = Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable); the answer is cut before it. Default: a newline.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (bf16/fp16 on GPU, fp32 on CPU), float32, bfloat16, float16.")]
QuantizeOpt = Annotated[str, typer.Option("--quantize", help="none; int8 (CPU: dynamic int8 Linear layers); 8bit or 4bit (bitsandbytes: GPU, or CPU from bitsandbytes 0.46).")]
BackendOpt = Annotated[str, typer.Option("--backend", help="transformers, or vllm when installed (GPU).")]
TemplateOpt = Annotated[str | None, typer.Option("--template", help="Prompt template with {prompt}, for models without a chat template.")]
PassageWordsOpt = Annotated[int, typer.Option("--max-passage-words", min=0, help="Cut each passage to this many words (0 = whole).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed for sampling.")]
LimitOpt = Annotated[int, typer.Option("--limit", min=0, help="Only the first N questions (0 = all).")]
RemoteOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow a model's own Python code (off unless you ask).")]
# Self-RAG (--arch selfrag); defaults follow the paper, --compat-upstream reproduces the reference scripts
ModeOpt = Annotated[str, typer.Option("--mode", help="Self-RAG: adaptive_retrieval, always_retrieve or no_retrieval.")]
ThresholdOpt = Annotated[float, typer.Option("--threshold", help="Self-RAG: retrieve when P([Retrieval]) normalised against [No Retrieval] exceeds this; negative: retrieve iff the model writes [Retrieval].")]
WRelOpt = Annotated[float, typer.Option("--w-rel", help="Self-RAG: weight of the relevance score.")]
WSupOpt = Annotated[float, typer.Option("--w-sup", help="Self-RAG: weight of the support (groundness) score.")]
WUseOpt = Annotated[float, typer.Option("--w-use", help="Self-RAG: weight of the utility score.")]
GroundOpt = Annotated[bool, typer.Option("--use-groundness/--no-groundness", help="Self-RAG: add the support score.")]
UtilityOpt = Annotated[bool, typer.Option("--use-utility/--no-utility", help="Self-RAG: add the utility score.")]
SeqScoreOpt = Annotated[bool, typer.Option("--use-seqscore/--no-seqscore", help="Self-RAG: add exp(mean token log-prob) of the continuation.")]
CompatOpt = Annotated[bool, typer.Option("--compat-upstream", help="Self-RAG: reproduce the reference scripts exactly, faults included (docs/selfrag.md).")]
LongFormOpt = Annotated[bool | None, typer.Option("--long-form/--short-form", help="Self-RAG: segment-level beam search (long answers) or one scored answer per passage. Default: long form for asqa, short otherwise.", show_default=False)]
BeamOpt = Annotated[int, typer.Option("--beam-width", min=1, help="Self-RAG long form: segments kept per level.")]
DepthOpt = Annotated[int, typer.Option("--max-depth", min=2, help="Self-RAG long form: levels of the segment tree (the root counts).")]
IgnoreContOpt = Annotated[bool, typer.Option("--ignore-cont", help="Self-RAG long form: drop segments judged [No support / Contradictory].")]
CLOSED_TASKS = ("arc_c", "pubhealth", "scifact")
LONG_FORM_TASKS = ("asqa",)


SELFRAG_OPTIONS = ("mode", "threshold", "k", "max_new_tokens", "batch_size", "w_rel", "w_sup", "w_use",
                   "use_groundness", "use_utility", "use_seqscore", "compat_upstream", "long_form", "beam_width",
                   "max_depth", "ignore_cont", "task")


def selfrag_config(options: dict[str, Any]) -> Any:
    """The Self-RAG decoding config from a command's options (`generate` and `eval` pass their locals(), so
    both forward the same flags)."""
    from ragkit.models.selfrag.decoding import SelfRagConfig
    from ragkit.models.selfrag.scoring import ScoringConfig

    o = {name: options[name] for name in SELFRAG_OPTIONS}
    scoring = ScoringConfig(w_rel=o["w_rel"], w_sup=o["w_sup"], w_use=o["w_use"], use_groundness=o["use_groundness"],
                            use_utility=o["use_utility"], use_seqscore=o["use_seqscore"],
                            compat_upstream=o["compat_upstream"])
    task = o["task"]
    config = SelfRagConfig(mode=o["mode"], threshold=o["threshold"] if o["threshold"] >= 0 else None, ndocs=o["k"],
                           max_new_tokens=o["max_new_tokens"], batch_size=o["batch_size"], closed=task in CLOSED_TASKS,
                           long_form=o["long_form"] if o["long_form"] is not None else task in LONG_FORM_TASKS,
                           beam_width=o["beam_width"], max_depth=o["max_depth"], ignore_cont=o["ignore_cont"],
                           scoring=scoring)
    config.validate()
    return config


RagDecodingOpt = Annotated[str | None, typer.Option("--rag-decoding", help="For a trained RAG checkpoint: token (greedy), token-beam (beam search, --num-beams), sequence-thorough or sequence-fast (default: what it was trained with).")]
NumBeamsOpt = Annotated[int, typer.Option("--num-beams", min=1, help="Beams for --rag-decoding token-beam.")]


def _refuse_unused(what: str, options: dict[str, bool]) -> None:
    """Options a decoding path does not honour fail loudly instead of being silently dropped."""
    from ragkit.errors import UsageError

    given = [name for name, is_set in options.items() if is_set]
    if given:
        raise UsageError(f"{', '.join(given)}: not used by {what}")


def build_generation(
    *, model: str, arch: str, index: Path | None, k: int, passages: str, max_new_tokens: int, do_sample: bool,
    temperature: float, top_p: float, top_k: int, stop: list[str] | None, batch_size: int, device: str, dtype: str,
    backend: str, template: str | None, max_passage_words: int, seed: int, trust_remote_code: bool,
    rag_decoding: str | None = None, selfrag: Any = None, retrieval: Any = None, quantize: str = "none",
    num_beams: int = 4,
) -> tuple[Any, Any, Any, Any]:
    """Load what a generation run needs (shared by `generate` and `eval`)."""
    from ragkit.errors import UsageError
    from ragkit.models.generator import GenerationConfig, load_generator
    from ragkit.models.rag_decoding import RagDecodingConfig, is_rag_checkpoint, load_rag_checkpoint
    from ragkit.reader import ARCHS, ReaderConfig
    from ragkit.retrieval.retriever import RetrievalMode, Retriever

    sampling = {"--do-sample": do_sample, "--temperature": temperature != 1.0, "--top-p": top_p != 1.0,
                "--top-k": top_k != 0, "--stop": stop is not None, "--template": template is not None}
    if is_rag_checkpoint(model):
        if arch != "rag":
            raise UsageError(f"{model} is a trained RAG checkpoint: use --arch rag")
        _refuse_unused("a trained RAG checkpoint, which decodes with --rag-decoding and --num-beams",
                       {**sampling, "--backend vllm": backend != "transformers"})
        from ragkit.models.encoder import resolve_device

        rag = load_rag_checkpoint(model, device=resolve_device(device), index=str(index) if index else None,
                                  quantize=quantize)
        mode = rag_decoding or ("token" if rag.config.loss == "token" else "sequence-thorough")
        return rag, GenerationConfig(max_new_tokens=max_new_tokens), RagDecodingConfig(mode, num_beams), None
    if arch == "selfrag":
        from ragkit.models.selfrag.loading import load_selfrag_decoder

        _refuse_unused("--arch selfrag, which decodes greedily in the Self-RAG prompt format", sampling)
        retriever = Retriever(index, device=device, mode=retrieval or RetrievalMode()) if index is not None else None
        decoder = load_selfrag_decoder(model, selfrag, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                       backend=backend, quantize=quantize)
        return decoder, None, ReaderConfig(arch="rag", k=k, source=passages, max_passage_words=0), retriever
    if arch not in ARCHS:
        raise UsageError(f"--arch {arch}: expected one of {', '.join(ARCHS)}, selfrag or retro")
    if index is not None and arch != "rag":
        raise UsageError("--index is only used with --arch rag")
    reader = ReaderConfig(arch=arch, k=k, source=passages, max_passage_words=max_passage_words, template=template)
    gen_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                  top_p=top_p, top_k=top_k, stop=tuple(stop) if stop is not None else ("\n",),
                                  batch_size=batch_size, seed=seed)
    retriever = None
    if arch == "rag" and index is not None:
        retriever = Retriever(index, device=device, mode=retrieval or RetrievalMode())
    generator = load_generator(model, backend=backend, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                               quantize=quantize)
    return generator, gen_config, reader, retriever


def run_blocks(questions: list[Any], generator: Any, gen_config: Any, reader: Any, retriever: Any, label: str,
               block: int = 32) -> Any:
    """Answer in blocks with a progress bar; yields output rows in input order.

    `generator` is a Generator (retrieve-then-read) or a trained RAG model (`reader` is then its
    decoding mode)."""
    from ragkit.console import info, progress
    from ragkit.models.encoder import Throughput
    from ragkit.models.rag import RagForTraining
    from ragkit.models.selfrag.decoding import SelfRagDecoder
    from ragkit.reader import answer, answer_with_rag_checkpoint, answer_with_selfrag

    meter = Throughput()
    with progress() as bar:
        task = bar.add_task(label, total=len(questions), rate="")
        for start in range(0, len(questions), block):
            chunk = questions[start : start + block]
            if isinstance(generator, SelfRagDecoder):
                rows = answer_with_selfrag(chunk, generator, reader, retriever)
            elif isinstance(generator, RagForTraining):
                rows = answer_with_rag_checkpoint(chunk, generator, decoding=reader, max_new_tokens=gen_config.max_new_tokens)
            else:
                rows = answer(chunk, generator, gen_config, reader, retriever)
            meter.add(len(rows))
            bar.update(task, advance=len(rows), rate=f"{meter.rate:.2f} q/s")
            yield from rows
    device = getattr(generator, "device", None) or next(generator.parameters()).device
    info(f"answered {meter.count} questions in {meter.seconds:.1f}s ({meter.rate:.2f} questions/s, {device})")


def generate(
    input_file: Annotated[str, typer.Argument(help="Questions: JSONL (question/instruction, optional id, ctxs) or plain lines; - for stdin.")] = "-",
    model: ModelGen = "smollm2-135m",
    arch: ArchOpt = "none",
    index: IndexOpt = None,
    k: KOpt = 5,
    passages: PassagesOpt = "auto",
    task: Annotated[str | None, typer.Option("--task", help="Read the input as this eval task's file and prompt as the task does (e.g. arc_c).")] = None,
    max_new_tokens: MaxNewOpt = 32,
    do_sample: SampleOpt = False,
    temperature: TempOpt = 1.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    stop: StopOpt = None,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    backend: BackendOpt = "transformers",
    quantize: QuantizeOpt = "none",
    template: TemplateOpt = None,
    max_passage_words: PassageWordsOpt = 150,
    seed: SeedOpt = 0,
    limit: LimitOpt = 0,
    trust_remote_code: RemoteOpt = False,
    rag_decoding: RagDecodingOpt = None,
    num_beams: NumBeamsOpt = 4,
    mode: ModeOpt = "adaptive_retrieval",
    threshold: ThresholdOpt = 0.2,
    w_rel: WRelOpt = 1.0,
    w_sup: WSupOpt = 1.0,
    w_use: WUseOpt = 0.5,
    use_groundness: GroundOpt = True,
    use_utility: UtilityOpt = True,
    use_seqscore: SeqScoreOpt = True,
    compat_upstream: CompatOpt = False,
    long_form: LongFormOpt = None,
    beam_width: BeamOpt = 2,
    max_depth: DepthOpt = 6,
    ignore_cont: IgnoreContOpt = False,
    retrieval_mode: RetrievalModeOpt = "dense",
    fusion: FusionOpt = "rrf",
    dense_weight: DenseWeightOpt = 0.5,
    workdir: WorkdirOpt = None,
    num_samples: Annotated[int, typer.Option("--num-samples", min=1, help="RETRO: continuations sampled per prompt.")] = 1,
    unconditional: Annotated[bool, typer.Option("--unconditional", help="RETRO: sample from nothing (the start-of-document token) instead of reading prompts.")] = False,
    no_retrieval: NoRetrievalOpt = False,
    table: Annotated[bool, typer.Option("--table", help="Also print question, top passage and answer as a table on stderr.")] = False,
) -> None:
    """Answer questions closed-book (--arch none), retrieve-then-read (--arch rag) or with Self-RAG; JSONL out.

    Each output line: {"id", "question", "output", "passages": [{id, title, text, score}], "new_tokens",
    "timings", ...the input's other fields}.

    Examples:

      echo "Who wrote Hamlet?" | ragkit generate

      ragkit generate questions.jsonl --arch rag --index idx/ --k 5 > answers.jsonl

      ragkit generate popqa_longtail_w_gs.jsonl --arch rag --passages ctxs | ragkit eval --task popqa --data popqa_longtail_w_gs.jsonl

      ragkit index search idx/ -q q.jsonl | ragkit generate --arch rag --passages hits | ragkit eval --task popqa --data q.jsonl

      ragkit generate popqa_longtail_w_gs.jsonl -m selfrag/selfrag_llama2_7b --arch selfrag --mode adaptive_retrieval --k 10

      echo '{"prompt": "ROMEO:"}' | ragkit generate --arch retro -m runs/retro/final --do-sample --top-k 40 --max-new-tokens 128
    """
    options = dict(locals())
    if arch == "retro":
        with handle_errors():
            if quantize != "none":
                from ragkit.errors import UsageError

                raise UsageError(f"--quantize {quantize} is not available for --arch retro")
            # RETRO retrieves from its own work folder at every chunk boundary and continues raw text
            _refuse_unused("--arch retro, which retrieves from its --workdir and continues raw text", {
                "--index": index is not None, "--k": k != 5, "--stop": stop is not None, "--template": template is not None,
                "--backend vllm": backend != "transformers", "--rag-decoding": rag_decoding is not None,
                "--task": task is not None})
        _generate_retro(options)
        return
    with handle_errors():
        from ragkit.models.registry import resolve
        from ragkit.reader import read_questions

        resolve(model)  # a missing local model fails before any input is read
        questions = read_questions(input_file, limit=limit, task=task)
        generator, gen_config, reader, retriever = build_generation(
            model=model, arch=arch, index=index, k=k, passages=passages, max_new_tokens=max_new_tokens,
            do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k, stop=stop, batch_size=batch_size,
            device=device, dtype=dtype, backend=backend, template=template, max_passage_words=max_passage_words,
            seed=seed, trust_remote_code=trust_remote_code, rag_decoding=rag_decoding, num_beams=num_beams,
            selfrag=selfrag_config(options) if arch == "selfrag" else None,
            retrieval=mode_from_flags(retrieval_mode, fusion, dense_weight), quantize=quantize,
        )
        shown = []
        for row in run_blocks(questions, generator, gen_config, reader, retriever, f"generate ({arch})"):
            row.pop("retrieval_query", None)
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
            sys.stdout.flush()
            if table:
                shown.append(row)
        if table:
            _print_answers(shown)


def _generate_retro(o: dict[str, Any]) -> None:
    """Continue each prompt (JSONL `prompt`/`text`/`question`, or plain lines) with a trained RETRO model,
    retrieving at every chunk boundary."""
    with handle_errors():
        from ragkit.console import info
        from ragkit.errors import InputError, Location
        from ragkit.io.jsonl import display_name, iter_records
        from ragkit.retro.generate import SamplingConfig, load_retro, prompt_ids, sample
        from ragkit.retro.pipeline import end_of_document_id

        loaded = load_retro(o["model"], workdir=o["workdir"], device=o["device"], retrieval=not o["no_retrieval"])
        prompts: list[tuple[str, str]] = []
        if o["unconditional"]:
            prompts = [("0", "")]
        else:
            name = display_name(o["input_file"])
            for lineno, record in iter_records(o["input_file"]):
                if isinstance(record, dict):
                    text = next((record[f] for f in ("prompt", "text", "question") if isinstance(record.get(f), str)), None)
                    if text is None:
                        raise InputError(Location(name, lineno, "prompt"), "missing: give prompt, text or question")
                    prompts.append((str(record.get("id", lineno)), text))
                else:
                    prompts.append((str(lineno), record))
                if o["limit"] and len(prompts) >= o["limit"]:
                    break
        config = SamplingConfig(max_new_tokens=o["max_new_tokens"], temperature=o["temperature"] if o["do_sample"] else 0.0,
                                top_k=o["top_k"], top_p=o["top_p"], num_samples=o["num_samples"], seed=o["seed"])
        tokenizer = loaded.tokenizer
        total_tokens = total_seconds = 0.0
        for pid, text in prompts:
            result = sample(loaded.model, prompt_ids(tokenizer, text), config, loaded.retriever,
                            eos_id=end_of_document_id(tokenizer))
            outputs = [tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]
            new = sum(len(t) for t in result.tokens)
            total_tokens, total_seconds = total_tokens + new, total_seconds + result.seconds
            row = {"id": pid, "prompt": text, "output": outputs[0], "new_tokens": len(result.tokens[0]),
                   "retrieved": result.retrieved,
                   "timings": {"generate_s": round(result.seconds, 4), "retrieval_s": round(result.retrieval_seconds, 4),
                               "tokens_per_s": round(new / result.seconds, 2) if result.seconds else None}}
            if len(outputs) > 1:
                row["samples"] = outputs
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
            sys.stdout.flush()
        if total_seconds:
            info(f"retro: {int(total_tokens)} tokens in {total_seconds:.1f}s ({total_tokens / total_seconds:.1f} tokens/s)")


def _print_answers(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    from ragkit.console import stderr

    table = Table(show_lines=True)
    table.add_column("question", ratio=2)
    table.add_column("top passage", ratio=3)
    table.add_column("answer", ratio=2)
    for row in rows:
        top = row["passages"][0] if row.get("passages") else None
        shown = "-" if top is None else f"{top['title']}: {top['text'][:160]}" + ("…" if len(top["text"]) > 160 else "")
        table.add_row(row["question"], shown, row["output"])
    stderr.print(table)
