"""The training configuration: one dataclass, filled from defaults, then a TOML/YAML file, then flags."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragkit.archs.registry import TRAINABLE as ARCHS
from ragkit.io.jsonl import is_int, is_number, read_text
from ragkit.errors import InputError, Location, ResourceError, UsageError

SCHEDULERS = ("linear", "cosine", "polynomial", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
TRACKERS = ("none", "tensorboard", "mlflow", "wandb")  # transformers.Trainer's report_to integrations


@dataclass
class TrainConfig:
    arch: str = field(default="rag", metadata={"help": "rag, selfrag-critic, selfrag, retro or embedder"})
    data: str = field(default="", metadata={"help": "training data: JSONL (question, answers) or an HF RAG folder"})
    output: str = field(default="", metadata={"help": "run folder: checkpoints, metrics.jsonl, cost report"})
    index: str = field(default="", metadata={"help": "ragkit index the retriever searches (kept fixed)"})
    generator: str = field(default="smollm2-135m", metadata={"help": "generator: hub id, folder, .gguf or alias"})
    query_encoder: str | None = field(default=None, metadata={"help": "query encoder (default: the index's embedder)"})
    embedder: str | None = field(default=None, metadata={"help": "embedder: the encoder fine-tuned (default: the index's embedder, else minilm)"})
    hard_negatives: int = field(default=0, metadata={"help": "embedder: hard negatives per pair, mined from --index (positives excluded)"})
    mini_batch_size: int = field(default=16, metadata={"help": "embedder --loss cached-mnrl: texts per forward pass"})
    n_docs: int = field(default=5, metadata={"help": "passages marginalised over"})
    loss: str | None = field(default=None, metadata={"help": "rag: sequence (RAG-Sequence, the default) or token (RAG-Token); embedder: mnrl (the default), cached-mnrl, cosine (scored pairs {sentence1, sentence2, score}) or margin-mse (with --distill-from, its default)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "epsilon of the smoothed loss"})
    end2end: bool = field(default=False, metadata={"help": "rag: also train the document encoder; the run's own copy of the index (OUTPUT/index) is refreshed as it trains"})
    refresh_steps: int = field(default=100, metadata={"help": "rag --end2end: refresh index vectors every N steps"})
    refresh_shards: int = field(default=1, metadata={"help": "rag --end2end: each refresh re-embeds 1/N of the passages, in turn (1: all)"})
    freeze_query_encoder: bool = field(default=False, metadata={"help": "train only the generator"})
    max_source_tokens: int = field(default=384, metadata={"help": "prompt tokens kept (passage + question)"})
    max_target_tokens: int = field(default=32, metadata={"help": "answer tokens kept"})
    max_passage_words: int = field(default=100, metadata={"help": "words of each passage in the prompt"})
    rag_prompt: str | None = field(default=None, metadata={"help": "rag: the generator's input: ragkit (the reader's prompt, in the chat template) or hf-rag (transformers' RAG format 'title / text // question', which an export as RagSequenceForGeneration / RagTokenForGeneration needs); default: hf-rag for a transformers RAG checkpoint, else ragkit"})
    distill_from: str | None = field(default=None, metadata={"help": "selfrag / selfrag-critic / rag: a teacher generator whose token distribution the student also learns (same vocabulary); embedder: a teacher embedder or cross-encoder whose query-passage score margins the student learns (MarginMSE)"})
    distill_alpha: float = field(default=0.5, metadata={"help": "with --distill-from (rag, selfrag): weight of the label loss (the rest: KL to the teacher)"})
    distill_temperature: float = field(default=2.0, metadata={"help": "with --distill-from: softmax temperature of the KL term"})
    eval_data: str = field(default="", metadata={"help": "rag: a validation set (JSONL question + answers) decoded every --eval-steps; its --eval-metric is logged and the best checkpoint kept"})
    eval_steps: int = field(default=0, metadata={"help": "rag: validate every N steps (0: every --save-steps)"})
    n_val: int = field(default=0, metadata={"help": "rag: validation questions used (the first N; 0: all; finetune_rag's --n_val)"})
    eval_batch_size: int = field(default=0, metadata={"help": "rag: questions decoded at once in validation (0: --batch-size)"})
    eval_max_new_tokens: int = field(default=0, metadata={"help": "rag: tokens generated per validation answer (0: --max-target-tokens; finetune_rag's --val_max_target_length)"})
    predict_data: str = field(default="", metadata={"help": "rag: a test set (JSONL question + answers) the final model answers after training: OUTPUT/test_predictions.jsonl and test EM/F1/match in the cost report (finetune_rag's --do_predict)"})
    predict_max_new_tokens: int = field(default=0, metadata={"help": "rag: tokens generated per test answer (0: --max-target-tokens; finetune_rag's --test_max_target_length)"})
    eval_metric: str = field(default="em", metadata={"help": "rag: em, f1 or match (SQuAD EM / token F1 / Self-RAG match): what picks the best checkpoint"})
    profile: bool = field(default=False, metadata={"help": "rag: time retrieval (the index search, in-process or on Ray, and with --end2end the re-encoding of the hits): retrieval_s per step and its share of the step in metrics.jsonl and the cost report"})
    dropout: float | None = field(default=None, metadata={"help": "rag / selfrag: the generator's dropout (its config's dropout, dropout_rate, hidden_dropout_prob or resid_pdrop; refused when it has none; default: the model's own)"})
    attention_dropout: float | None = field(default=None, metadata={"help": "rag / selfrag: the generator's attention dropout (attention_dropout, attention_probs_dropout_prob or attn_pdrop; default: the model's own)"})
    max_seq_length: int = field(default=1024, metadata={"help": "selfrag / selfrag-critic: tokens kept per example (prompt + output)"})
    workdir: str = field(default="", metadata={"help": "retro: work folder for chunks, embeddings, index and neighbours (a manifest decides what is rebuilt)"})
    glob: str = field(default="**/*.txt", metadata={"help": "retro: files of --data (a folder) to read; .jsonl files give one document per line (its text)"})
    reprocess: bool = field(default=False, metadata={"help": "retro: rebuild every stage of --workdir (also REPROCESS=1 in the environment, as RETRO-pytorch)"})
    max_chunks: int = field(default=0, metadata={"help": "retro: chunks kept at most (whole documents in file order; 0: all; RETRO-pytorch's max_chunks)"})
    max_seqs: int = field(default=0, metadata={"help": "retro: training sequences at most (the first ones; 0: all; RETRO-pytorch's max_seqs)"})
    max_index_memory: str | None = field(default=None, metadata={"help": "retro: memory budget of the chunk index, e.g. 2G (--index-spec auto picks within it; another spec over it is refused; autofaiss' max_index_memory_usage)"})
    tokenizer: str = field(default="smollm2-135m", metadata={"help": "retro: tokenizer (hub id, folder, .gguf or alias)"})
    index_spec: str = field(default="flat", metadata={"help": "retro: spec of the chunk index: flat, hnsw, ivf-pq, auto (with :key=value parameters) or a Faiss factory string"})
    chunk_size: int = field(default=64, metadata={"help": "retro: tokens per chunk (m)"})
    seq_len: int = field(default=512, metadata={"help": "retro: tokens per training sequence (a multiple of --chunk-size)"})
    num_neighbors: int = field(default=2, metadata={"help": "retro: neighbours per chunk (K)"})
    extra_neighbors: int = field(default=10, metadata={"help": "retro: extra hits fetched so that same-document neighbours can be dropped"})
    retro_dim: int = field(default=512, metadata={"help": "retro: model width"})
    retro_enc_dim: int = field(default=0, metadata={"help": "retro: neighbour-encoder width (RETRO-pytorch's enc_dim; 0: --retro-dim)"})
    retro_dec_depth: int = field(default=6, metadata={"help": "retro: decoder layers"})
    retro_enc_depth: int = field(default=2, metadata={"help": "retro: neighbour-encoder layers"})
    retro_heads: int = field(default=8, metadata={"help": "retro: attention heads"})
    retro_dim_head: int = field(default=64, metadata={"help": "retro: width of each head"})
    retro_cross_attn_layers: str = field(default="", metadata={"help": "retro: 0-indexed decoder layers with chunked cross-attention, comma-separated; 'none' for a decoder-only baseline (default: every third from the third)"})
    retro_deepnet: bool = field(default=False, metadata={"help": "retro: DeepNet residual scaling and initialisation"})
    attn_dropout: float = field(default=0.0, metadata={"help": "retro: attention dropout"})
    ff_dropout: float = field(default=0.0, metadata={"help": "retro: feed-forward dropout"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data (ignored when max_steps > 0)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps (-1: from epochs)"})
    batch_size: int = field(default=2, metadata={"help": "questions per device per step"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate (default: retro 3e-4, the others 3e-5)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    scheduler: str = field(default="linear", metadata={"help": "linear, cosine, polynomial or constant (after warmup)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "linear warmup as a fraction of all steps, in [0, 1) (instead of --warmup-steps; HF finetune_rag's --warmup_ratio)"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    precision: str = field(default="fp32", metadata={"help": "fp32, bf16 or fp16 (fp16 needs a GPU)"})
    seed: int = field(default=42, metadata={"help": "random seed (data order, dropout, init)"})
    quantize: str = field(default="none", metadata={"help": "none, or 4bit / 8bit base weights (bitsandbytes: GPU, or CPU from 0.46) under LoRA: QLoRA"})
    lora_r: int = field(default=-1, metadata={"help": "LoRA rank; 0: full fine-tuning; -1: the architecture's default (rag: full, selfrag and selfrag-critic: 8)"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_targets: str = field(default="", metadata={"help": "comma-separated module names (default: all linear)"})
    save_steps: int = field(default=100, metadata={"help": "checkpoint every N steps"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept"})
    logging_steps: int = field(default=10, metadata={"help": "log every N steps"})
    report_to: str = field(default="none", metadata={"help": "tracker: none, tensorboard, mlflow or wandb (logs under OUTPUT/runs, OUTPUT/mlflow.db / OUTPUT/mlruns unless MLFLOW_TRACKING_URI is set, or OUTPUT/wandb unless WANDB_DIR is; W&B runs offline without WANDB_API_KEY)"})
    gpu_hour_price: float = field(default=0.0, metadata={"help": "price of one GPU-hour, for the cost report's estimate (0: not priced)"})
    distributed_retriever: str = field(default="none", metadata={"help": "none (in-process) or ray (actors serve the index)"})
    num_retrieval_workers: int = field(default=1, metadata={"help": "Ray actors holding a replica of the index"})
    shard_index: bool = field(default=False, metadata={"help": "--index is a comma-separated list of shards, one Ray actor each"})
    ray_address: str | None = field(default=None, metadata={"help": "an existing Ray cluster (default: a private local Ray)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto"})
    deepspeed: str = field(default="", metadata={"help": "DeepSpeed JSON config (ZeRO stage 1, 2 or 3), passed to transformers.Trainer; needs the deepspeed package"})
    fsdp: bool = field(default=False, metadata={"help": "shard parameters, gradients and optimizer state with PyTorch FSDP (transformers.Trainer's; launch with torchrun / accelerate)"})
    fsdp_config: str = field(default="", metadata={"help": "FSDP JSON config file for transformers.Trainer (version, reshard_after_forward, cpu_offload, ...)"})

    def validate(self) -> None:
        self._check_ranges()
        if self.arch not in ARCHS:
            raise UsageError(f"--arch {self.arch}: expected one of {', '.join(ARCHS)}")
        if self.scheduler not in SCHEDULERS:
            raise UsageError(f"--scheduler {self.scheduler}: expected one of {', '.join(SCHEDULERS)}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision}: expected one of {', '.join(PRECISIONS)}")
        if self.report_to not in TRACKERS:
            raise UsageError(f"--tracker {self.report_to}: expected one of {', '.join(TRACKERS)}")
        if self.distributed_retriever not in ("none", "ray"):
            raise UsageError(f"--distributed-retriever {self.distributed_retriever}: expected none or ray")
        if self.quantize not in ("none", "4bit", "8bit"):
            raise UsageError(f"--quantize {self.quantize}: expected none, 4bit or 8bit")
        if self.quantize != "none" and (self.lora_r == 0 or self.arch not in ("rag", "selfrag", "selfrag-critic")):
            raise UsageError("--quantize trains LoRA adapters over quantised weights (QLoRA): use it with --lora-r > 0 "
                             "and --arch rag, selfrag or selfrag-critic")
        if self.distill_from and self.arch not in ("selfrag", "selfrag-critic", "embedder", "rag"):
            raise UsageError(f"--distill-from works with --arch rag, selfrag, selfrag-critic or embedder, not {self.arch}")
        if self.end2end and self.arch != "rag":
            raise UsageError("--end2end is for --arch rag")
        if self.end2end and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("--end2end refreshes the index inside the training process; run it as one process, "
                             "not under torchrun / accelerate with several")
        if self.end2end and self.distributed_retriever != "none":
            raise UsageError("--end2end refreshes the index in the training process; use --distributed-retriever none")
        if self.arch == "retro" and not self.workdir:
            raise UsageError("--arch retro needs --workdir (the folder for its chunks, index and neighbours)")
        if self.deepspeed and self.fsdp:
            raise UsageError("--deepspeed and --fsdp are two ways to shard training; pick one")
        if self.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
            raise UsageError("--fsdp shards over several processes: launch with torchrun --nproc_per_node N or "
                             "accelerate launch")
        if self.fsdp_config and not self.fsdp:
            raise UsageError("--fsdp-config needs --fsdp")
        if self.shard_index and self.distributed_retriever != "ray":
            raise UsageError("--shard-index needs --distributed-retriever ray")

    def _check_ranges(self) -> None:
        """Numbers a config file or a flag may set outside what they mean (`--max-steps -5` trained a full
        epoch): refused, naming the flag, wherever they came from."""
        for f in dataclasses.fields(self):  # `--lr inf` trained 101 of 103 tensors into NaN and exited 0
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"--{f.name.replace('_', '-')} {value}: must be a finite number")
        if not 0 <= self.seed < 2**32:  # numpy's and torch's seed range (`--seed -1` was a ValueError)
            raise UsageError(f"--seed {self.seed}: expected 0 to {2**32 - 1}")
        positive = ("n_docs", "refresh_steps", "refresh_shards", "max_source_tokens", "max_target_tokens",
                    "max_passage_words", "max_seq_length", "chunk_size", "seq_len", "num_neighbors", "retro_dim",
                    "retro_dec_depth", "retro_enc_depth", "retro_heads", "retro_dim_head", "batch_size", "grad_accum",
                    "save_steps", "save_total_limit", "logging_steps", "num_retrieval_workers", "mini_batch_size",
                    "epochs", "lora_alpha")
        non_negative = ("hard_negatives", "extra_neighbors", "retro_enc_dim", "max_chunks", "max_seqs", "eval_steps",
                        "n_val", "eval_batch_size", "eval_max_new_tokens", "predict_max_new_tokens", "weight_decay", "warmup_steps", "max_grad_norm",
                        "gpu_hour_price", "distill_temperature")  # rates in [0, 1] are checked below
        for name in positive:
            value = getattr(self, name)
            if is_number(value) and value <= 0:
                raise UsageError(f"--{name.replace('_', '-')} {value}: must be positive")
        for name in non_negative:
            value = getattr(self, name)
            if is_number(value) and value < 0:
                raise UsageError(f"--{name.replace('_', '-')} {value}: must be 0 or more")
        if self.max_steps == 0 or self.max_steps < -1:
            raise UsageError(f"--max-steps {self.max_steps}: must be positive (or -1: from --epochs)")
        if self.lora_r < -1:
            raise UsageError(f"--lora-r {self.lora_r}: expected a rank > 0, 0 (full fine-tuning) or -1 (default)")
        if self.lr is not None and self.lr <= 0:
            raise UsageError(f"--lr {self.lr}: must be positive")
        for name in ("label_smoothing", "attn_dropout", "ff_dropout", "lora_dropout", "distill_alpha", "dropout",
                     "attention_dropout"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise UsageError(f"--{name.replace('_', '-')} {value}: must be between 0 and 1")
        if self.eval_metric not in ("em", "f1", "match"):
            raise UsageError(f"--eval-metric {self.eval_metric}: expected em, f1 or match")
        if not 0 <= self.warmup_ratio < 1:
            raise UsageError(f"--warmup-ratio {self.warmup_ratio}: must be in [0, 1)")
        if self.warmup_ratio > 0 and self.warmup_steps > 0:
            raise UsageError("--warmup-ratio and --warmup-steps both set the warmup: give one")
        if not self.adam_epsilon > 0:
            raise UsageError(f"--adam-epsilon {self.adam_epsilon}: must be positive")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 3e-4 if self.arch == "retro" else 3e-5  # retro trains from scratch; the others fine-tune

    def require_paths(self) -> None:
        for name in ("data", "output"):
            if not getattr(self, name):
                raise UsageError(f"--{name} is required")
        if Path(self.output).exists() and not Path(self.output).is_dir():  # was FileExistsError, exit 1
            raise UsageError(f"--output {self.output}: exists and is not a folder (a run folder is written there)")
        for name in ("deepspeed", "fsdp_config"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                raise ResourceError(f"{value}: no such {name.replace('_', ' ')} file (--{name.replace('_', '-')})")
        if self.deepspeed:
            import importlib.util

            _check_deepspeed_config(Path(self.deepspeed))
            if importlib.util.find_spec("deepspeed") is None:
                raise ResourceError("--deepspeed: the deepspeed package is not installed", hint="pip install deepspeed")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# The architecture sections of the schema: the fields each architecture reads. A field in no section is common
# (the trainer's own: data, output, steps, optimiser, precision, checkpoints, tracker, device, sharding).
# A flag or config key from another architecture's section is refused (exit 2), never silently dropped.
_LORA = ("quantize", "lora_r", "lora_alpha", "lora_dropout", "lora_targets")
_DROPOUT = ("dropout", "attention_dropout")
_SELFRAG = ("generator", "distill_from", "distill_alpha", "distill_temperature", "max_seq_length", *_DROPOUT, *_LORA)
ARCH_FIELDS: dict[str, tuple[str, ...]] = {
    "rag": ("index", "generator", "query_encoder", "n_docs", "loss", "label_smoothing", "end2end", "refresh_steps",
            "refresh_shards", "freeze_query_encoder", "max_source_tokens", "max_target_tokens", "max_passage_words",
            "rag_prompt", "distributed_retriever", "num_retrieval_workers", "shard_index", "ray_address", "profile", "eval_data",
            "eval_steps", "n_val", "eval_batch_size", "eval_max_new_tokens", "predict_max_new_tokens", "eval_metric", "predict_data",
            "predict_max_new_tokens", "distill_from",
            "distill_alpha", "distill_temperature", *_DROPOUT, *_LORA),
    "selfrag": _SELFRAG,
    "selfrag-critic": _SELFRAG,
    "embedder": ("embedder", "index", "hard_negatives", "mini_batch_size", "loss", "distill_from"),
    "retro": ("workdir", "glob", "reprocess", "max_chunks", "max_seqs", "max_index_memory", "tokenizer", "index_spec", "chunk_size", "seq_len", "num_neighbors",
              "extra_neighbors", "embedder", "retro_dim", "retro_enc_dim", "retro_dec_depth", "retro_enc_depth", "retro_heads",
              "retro_dim_head", "retro_cross_attn_layers", "retro_deepnet", "attn_dropout", "ff_dropout"),
}
ARCH_SPECIFIC = frozenset(name for names in ARCH_FIELDS.values() for name in names)


def fields_of(arch: str) -> set[str]:
    """Every field `arch` honours: the common ones and its own section."""
    return (set(FIELDS) - ARCH_SPECIFIC) | set(ARCH_FIELDS.get(arch, ()))


def refuse_other_sections(arch: str, given: dict[str, str]) -> None:
    """`given`: field -> where it was set (a flag, or a config file's key)."""
    unused = [where for name, where in given.items() if name not in fields_of(arch)]
    if unused:
        raise UsageError(f"{', '.join(unused)}: not used by --arch {arch}",
                         hint=f"--arch {arch} reads: {', '.join('--' + n.replace('_', '-') for n in ARCH_FIELDS.get(arch, ()))} "
                              "and the trainer's common options.")


def _check_deepspeed_config(path: Path) -> None:
    """A DeepSpeed config must be a JSON object; every ZeRO stage works (tested on two CPU ranks for each
    architecture: stage 2 and 3 reach the weights plain DDP reaches)."""
    try:
        data = json.loads(read_text(path))
    except (OSError, ValueError) as exc:
        raise InputError(Location(str(path)), f"not a DeepSpeed JSON config: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(Location(str(path)), "not a DeepSpeed JSON config: expected an object")


def load_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ResourceError(f"{p}: no such config file")
    text = read_text(p)
    try:
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text) or {}
            except yaml.YAMLError as exc:  # not a ValueError; its problem mark holds the line
                mark = getattr(exc, "problem_mark", None)
                problem = getattr(exc, "problem", None) or type(exc).__name__
                raise InputError(Location(str(p), mark.line + 1 if mark else None),
                                 f"unreadable YAML config ({problem})") from None
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            raise UsageError(f"--config {p}: expected a .toml, .yaml or .json file")
    except (ValueError, ImportError) as exc:  # tomllib and json parse errors are ValueError subclasses
        line = getattr(exc, "lineno", None)
        raise InputError(Location(str(p), line), f"unreadable config ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(Location(str(p)), "a config file must be a table of key = value")
    # A key the options do not have, or a value of the wrong type, is a usage error (exit 2) as the same option
    # given as a flag would be, and as a key of another architecture's section is; the message names the
    # file and the key. A file that does not parse is an input error (exit 3, naming the line).
    for key, value in data.items():
        if key.replace("-", "_") not in FIELDS:
            raise UsageError(f"{p}: key '{key}': unknown key", hint=f"Known keys: {', '.join(FIELDS)}.")
        declared = FIELDS[key.replace("-", "_")].type
        if not _has_type(value, declared):
            raise UsageError(f"{p}: key '{key}': {value!r} is not {_TYPE_NAMES[declared]}")
    return {k.replace("-", "_"): v for k, v in data.items()}


# The field types TrainConfig uses (as strings: the module has postponed annotations) and how a config file's
# value is checked against each: a string where a number belongs failed later as a TypeError (exit 1)
_TYPE_NAMES = {"bool": "true or false", "int": "an integer", "float": "a number", "float | None": "a number",
               "str": "a string", "str | None": "a string"}


def _has_type(value: Any, declared: str) -> bool:
    if value is None:
        return declared.endswith("| None")
    base = declared.removesuffix(" | None")
    if base == "bool":
        return isinstance(value, bool)
    if base == "int":
        return is_int(value)
    if base == "float":
        return is_number(value)
    return isinstance(value, str)


def resolve_config(file: str | Path | None, flags: dict[str, Any]) -> TrainConfig:
    """Defaults, then the file, then every flag the user actually gave (None means not given)."""
    values: dict[str, Any] = load_config_file(file) if file else {}
    given = {name: f"{file}: key '{name}'" for name in values}
    given.update({k: "--" + k.replace("_", "-") for k, v in flags.items() if v is not None})
    values.update({k: v for k, v in flags.items() if v is not None})
    config = TrainConfig(**values)
    if config.arch in ARCHS:  # an unknown one is refused by validate, naming the known ones
        refuse_other_sections(config.arch, {k: w for k, w in given.items() if k != "arch"})
    config.validate()
    return config
