"""`ragkit train --arch ...` and the aliases `train-rag`, `train-selfrag`, `train-retro`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ragkit.commands._common import handle_errors
from ragkit.train.config import FIELDS

# Options default to None ("not given") so that a --config file can set them; the help shows the real
# default from TrainConfig.


def _help(name: str) -> str:
    f = FIELDS[name]
    return f"{f.metadata['help']} [default: {f.default}]"


def train(
    ctx: typer.Context,
    arch: Annotated[str | None, typer.Option("--arch", help=_help("arch"))] = None,
    data: Annotated[str | None, typer.Option("--data", help=_help("data"))] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help=_help("output"))] = None,
    index: Annotated[str | None, typer.Option("--index", help=_help("index"))] = None,
    generator: Annotated[str | None, typer.Option("--generator", help=_help("generator"))] = None,
    query_encoder: Annotated[str | None, typer.Option("--query-encoder", help=_help("query_encoder"))] = None,
    embedder: Annotated[str | None, typer.Option("--embedder", help=_help("embedder"))] = None,
    hard_negatives: Annotated[int | None, typer.Option("--hard-negatives", min=0, help=_help("hard_negatives"))] = None,
    mini_batch_size: Annotated[int | None, typer.Option("--mini-batch-size", min=1, help=_help("mini_batch_size"))] = None,
    n_docs: Annotated[int | None, typer.Option("--n-docs", min=1, help=_help("n_docs"))] = None,
    loss: Annotated[str | None, typer.Option("--loss", help=_help("loss"))] = None,
    label_smoothing: Annotated[float | None, typer.Option("--label-smoothing", min=0.0, max=1.0, help=_help("label_smoothing"))] = None,
    end2end: Annotated[bool | None, typer.Option("--end2end", help=_help("end2end"), show_default=False)] = None,
    refresh_steps: Annotated[int | None, typer.Option("--refresh-steps", min=1, help=_help("refresh_steps"))] = None,
    refresh_shards: Annotated[int | None, typer.Option("--refresh-shards", min=1, help=_help("refresh_shards"))] = None,
    freeze_query_encoder: Annotated[bool | None, typer.Option("--freeze-query-encoder/--train-query-encoder", help=_help("freeze_query_encoder"), show_default=False)] = None,
    max_source_tokens: Annotated[int | None, typer.Option("--max-source-tokens", min=8, help=_help("max_source_tokens"))] = None,
    max_target_tokens: Annotated[int | None, typer.Option("--max-target-tokens", min=2, help=_help("max_target_tokens"))] = None,
    max_passage_words: Annotated[int | None, typer.Option("--max-passage-words", min=0, help=_help("max_passage_words"))] = None,
    rag_prompt: Annotated[str | None, typer.Option("--rag-prompt", help=_help("rag_prompt"))] = None,
    distill_from: Annotated[str | None, typer.Option("--distill-from", help=_help("distill_from"))] = None,
    distill_alpha: Annotated[float | None, typer.Option("--distill-alpha", min=0.0, max=1.0, help=_help("distill_alpha"))] = None,
    distill_temperature: Annotated[float | None, typer.Option("--distill-temperature", min=0.01, help=_help("distill_temperature"))] = None,
    max_seq_length: Annotated[int | None, typer.Option("--max-seq-length", min=8, help=_help("max_seq_length"))] = None,
    workdir: Annotated[str | None, typer.Option("--workdir", help=_help("workdir"))] = None,
    glob: Annotated[str | None, typer.Option("--glob", help=_help("glob"))] = None,
    reprocess: Annotated[bool | None, typer.Option("--reprocess", help=_help("reprocess"), show_default=False)] = None,
    max_chunks: Annotated[int | None, typer.Option("--max-chunks", "--max_chunks", min=0, help=_help("max_chunks"))] = None,
    max_seqs: Annotated[int | None, typer.Option("--max-seqs", "--max_seqs", min=0, help=_help("max_seqs"))] = None,
    max_index_memory: Annotated[str | None, typer.Option("--max-index-memory", help=_help("max_index_memory"))] = None,
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help=_help("tokenizer"))] = None,
    index_spec: Annotated[str | None, typer.Option("--index-spec", help=_help("index_spec"))] = None,
    chunk_size: Annotated[int | None, typer.Option("--chunk-size", min=1, help=_help("chunk_size"))] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", min=1, help=_help("seq_len"))] = None,
    num_neighbors: Annotated[int | None, typer.Option("--num-neighbors", min=1, help=_help("num_neighbors"))] = None,
    extra_neighbors: Annotated[int | None, typer.Option("--extra-neighbors", min=0, help=_help("extra_neighbors"))] = None,
    retro_dim: Annotated[int | None, typer.Option("--retro-dim", min=8, help=_help("retro_dim"))] = None,
    retro_enc_dim: Annotated[int | None, typer.Option("--retro-enc-dim", min=0, help=_help("retro_enc_dim"))] = None,
    retro_dec_depth: Annotated[int | None, typer.Option("--retro-dec-depth", min=1, help=_help("retro_dec_depth"))] = None,
    retro_enc_depth: Annotated[int | None, typer.Option("--retro-enc-depth", min=1, help=_help("retro_enc_depth"))] = None,
    retro_heads: Annotated[int | None, typer.Option("--retro-heads", min=1, help=_help("retro_heads"))] = None,
    retro_dim_head: Annotated[int | None, typer.Option("--retro-dim-head", min=2, help=_help("retro_dim_head"))] = None,
    retro_cross_attn_layers: Annotated[str | None, typer.Option("--retro-cross-attn-layers", help=_help("retro_cross_attn_layers"))] = None,
    retro_deepnet: Annotated[bool | None, typer.Option("--retro-deepnet", help=_help("retro_deepnet"), show_default=False)] = None,
    attn_dropout: Annotated[float | None, typer.Option("--attn-dropout", min=0.0, max=1.0, help=_help("attn_dropout"))] = None,
    ff_dropout: Annotated[float | None, typer.Option("--ff-dropout", min=0.0, max=1.0, help=_help("ff_dropout"))] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", min=0.0, help=_help("epochs"))] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help=_help("max_steps"))] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help=_help("batch_size"))] = None,
    grad_accum: Annotated[int | None, typer.Option("--grad-accum", min=1, help=_help("grad_accum"))] = None,
    lr: Annotated[float | None, typer.Option("--lr", min=0.0, help=_help("lr"))] = None,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay", min=0.0, help=_help("weight_decay"))] = None,
    scheduler: Annotated[str | None, typer.Option("--scheduler", help=_help("scheduler"))] = None,
    warmup_steps: Annotated[int | None, typer.Option("--warmup-steps", "--warmup_steps", min=0, help=_help("warmup_steps"))] = None,
    warmup_ratio: Annotated[float | None, typer.Option("--warmup-ratio", "--warmup_ratio", min=0.0, max=0.999999, help=_help("warmup_ratio"))] = None,
    adam_epsilon: Annotated[float | None, typer.Option("--adam-epsilon", "--adam_epsilon", help=_help("adam_epsilon"))] = None,
    eval_data: Annotated[str | None, typer.Option("--eval-data", help=_help("eval_data"))] = None,
    eval_steps: Annotated[int | None, typer.Option("--eval-steps", "--eval_steps", min=0, help=_help("eval_steps"))] = None,
    n_val: Annotated[int | None, typer.Option("--n-val", "--n_val", min=0, help=_help("n_val"))] = None,
    eval_batch_size: Annotated[int | None, typer.Option("--eval-batch-size", "--eval_batch_size", min=0, help=_help("eval_batch_size"))] = None,
    eval_max_new_tokens: Annotated[int | None, typer.Option("--eval-max-new-tokens", "--val-max-target-length", "--val_max_target_length", min=0, help=_help("eval_max_new_tokens"))] = None,
    eval_metric: Annotated[str | None, typer.Option("--eval-metric", help=_help("eval_metric"))] = None,
    predict_data: Annotated[str | None, typer.Option("--predict-data", help=_help("predict_data"))] = None,
    predict_max_new_tokens: Annotated[int | None, typer.Option("--predict-max-new-tokens", "--test-max-target-length", "--test_max_target_length", min=0, help=_help("predict_max_new_tokens"))] = None,
    profile: Annotated[bool | None, typer.Option("--profile", help=_help("profile"), show_default=False)] = None,
    dropout: Annotated[float | None, typer.Option("--dropout", min=0.0, max=1.0, help=_help("dropout"))] = None,
    attention_dropout: Annotated[float | None, typer.Option("--attention-dropout", "--attention_dropout", min=0.0, max=1.0, help=_help("attention_dropout"))] = None,
    max_grad_norm: Annotated[float | None, typer.Option("--max-grad-norm", min=0.0, help=_help("max_grad_norm"))] = None,
    precision: Annotated[str | None, typer.Option("--precision", help=_help("precision"))] = None,
    seed: Annotated[int | None, typer.Option("--seed", help=_help("seed"))] = None,
    quantize: Annotated[str | None, typer.Option("--quantize", help=_help("quantize"))] = None,
    lora_r: Annotated[int | None, typer.Option("--lora-r", min=-1, help=_help("lora_r"))] = None,
    lora_alpha: Annotated[int | None, typer.Option("--lora-alpha", min=1, help=_help("lora_alpha"))] = None,
    lora_dropout: Annotated[float | None, typer.Option("--lora-dropout", min=0.0, max=1.0, help=_help("lora_dropout"))] = None,
    lora_targets: Annotated[str | None, typer.Option("--lora-targets", help=_help("lora_targets"))] = None,
    save_steps: Annotated[int | None, typer.Option("--save-steps", min=1, help=_help("save_steps"))] = None,
    save_total_limit: Annotated[int | None, typer.Option("--save-total-limit", min=1, help=_help("save_total_limit"))] = None,
    logging_steps: Annotated[int | None, typer.Option("--logging-steps", min=1, help=_help("logging_steps"))] = None,
    report_to: Annotated[str | None, typer.Option("--tracker", "--report-to", help=_help("report_to"))] = None,
    gpu_hour_price: Annotated[float | None, typer.Option("--gpu-hour-price", min=0.0, help=_help("gpu_hour_price"))] = None,
    device: Annotated[str | None, typer.Option("--device", help=_help("device"))] = None,
    distributed_retriever: Annotated[str | None, typer.Option("--distributed-retriever", help=_help("distributed_retriever"))] = None,
    num_retrieval_workers: Annotated[int | None, typer.Option("--num-retrieval-workers", min=1, help=_help("num_retrieval_workers"))] = None,
    shard_index: Annotated[bool | None, typer.Option("--shard-index", help=_help("shard_index"), show_default=False)] = None,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help=_help("ray_address"))] = None,
    deepspeed: Annotated[str | None, typer.Option("--deepspeed", help=_help("deepspeed"))] = None,
    fsdp: Annotated[bool | None, typer.Option("--fsdp", help=_help("fsdp"), show_default=False)] = None,
    fsdp_config: Annotated[str | None, typer.Option("--fsdp-config", help=_help("fsdp_config"))] = None,
    config: Annotated[Path | None, typer.Option("--config", help="TOML/YAML/JSON file with any of these options (flags win; unknown keys are an error).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in --output (model, optimizer, scheduler, RNG, data position).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the cost report as JSON on stdout.")] = False,
) -> None:
    """Train on the one trainer: --arch rag, selfrag, selfrag-critic, embedder or retro.

    Writes OUTPUT/checkpoint-N/ and OUTPUT/final/ (rag: generator/ and query_encoder/, + doc_encoder/
    with --end2end; selfrag and selfrag-critic: model/ with the reflection tokens; embedder: embedder/;
    retro: model/ and retro.json;
    all open with plain transformers, peft and sentence-transformers), OUTPUT/metrics.jsonl,
    OUTPUT/cost_report.json and the resolved config.

    Examples:

      ragkit train --arch rag --data train.jsonl --index idx/ -o runs/rag --max-steps 300 --lora-r 8

      ragkit train --arch rag --data hf_rag_dir/ --index idx/ -o runs/rag --loss token --n-docs 5

      ragkit train --arch selfrag-critic --data critic_train.json -o runs/critic --generator meta-llama/Llama-2-7b-hf

      ragkit train --arch embedder --data beir_scifact/ --index idx/ --hard-negatives 1 -o runs/emb

      ragkit train --arch retro --data texts/ --glob '**/*.txt' --workdir work/ -o runs/retro --max-steps 1000

      ragkit train --config run.toml --resume
    """
    flags: dict[str, Any] = {k: v for k, v in ctx.params.items() if k in FIELDS}
    _run(flags, config, resume, as_json)


def _run(flags: dict[str, Any], config: Path | None, resume: bool, as_json: bool) -> None:
    with handle_errors():
        from rich.table import Table

        from ragkit.console import stderr, stdout_to_stderr
        from ragkit.train.config import resolve_config
        from ragkit.archs.registry import fit

        resolved = resolve_config(config, flags)
        resolved.require_paths()
        if resolved.distributed_retriever == "ray":
            from ragkit.retrieval.loopback import reexec_with_loopback
            from ragkit.retrieval.ray_retriever import uses_private_ray

            if uses_private_ray(resolved.ray_address):
                reexec_with_loopback()  # before any model loads: the driver's Ray listener on 127.0.0.1 too
        with stdout_to_stderr():  # stdout is for the --json report alone
            report = fit(resolved, resume=resume)
        _leave_process_group()
        if int(os.environ.get("RANK", "0")) != 0:
            return  # under torchrun / accelerate, rank 0 alone reports (its report covers every rank)
        table = Table(title=f"cost report: {resolved.output}", show_header=False, title_justify="left")
        for key, value in report.to_json().items():
            table.add_row(key, f"{value:,.2f}" if isinstance(value, float) else str(value))
        stderr.print(table)
        if as_json:
            sys.stdout.write(json.dumps(report.to_json()) + "\n")


def _leave_process_group() -> None:
    """Under torchrun / accelerate, tear the process group down before the command exits. A rank that
    exited with it alive (rank 1 returns at once; rank 0 still prints) was seen aborting in C++
    ("terminate called without an active exception", exit -6) after DeepSpeed ZeRO-3 runs."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _alias(arch: str, doc: str) -> Any:
    def command(ctx: typer.Context) -> None:
        # the alias forwards every option to `ragkit train --arch ARCH`
        from ragkit.cli import app

        app(["train", "--arch", arch, *ctx.args], standalone_mode=True)

    command.__doc__ = doc
    return command


def register(app: typer.Typer) -> None:
    passthrough = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
    app.command("train")(train)
    app.command("train-rag", context_settings=passthrough)(_alias("rag", "Alias of `ragkit train --arch rag`."))
    app.command("train-selfrag", context_settings=passthrough)(_alias("selfrag", "Alias of `ragkit train --arch selfrag`."))
    app.command("train-retro", context_settings=passthrough)(_alias("retro", "Alias of `ragkit train --arch retro`."))
