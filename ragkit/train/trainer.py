"""The one trainer: `transformers.Trainer` with only the architecture-specific parts overridden.

Trainer already gives devices, accelerate/torchrun/DeepSpeed/FSDP, bf16/fp16, gradient accumulation,
clipping, schedulers with warmup, tensorboard/MLflow and exact resume (optimizer, scheduler, RNG, data
position). An architecture plugs in through `Arch`: build the model, collate a batch, save and load its
weights in formats that plain transformers / peft / sentence-transformers open.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import resource
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset

from ragkit.models.lm import quiet_bitsandbytes

quiet_bitsandbytes()  # transformers.Trainer imports peft, which imports bitsandbytes: silence it first
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed  # noqa: E402

from ragkit.errors import RagkitError, ResourceError
from ragkit.io.atomic import disk_full, is_disk_full, write_json
from ragkit.train.checkpoints import mark_complete, resume_checkpoint, rotate
from ragkit.train.config import TrainConfig

CONFIG_FILE = "ragkit_train_config.json"


class Arch(Protocol):
    """What an architecture gives the trainer."""

    def build(self, config: TrainConfig, device: str) -> torch.nn.Module: ...
    def dataset(self, config: TrainConfig) -> Dataset: ...
    def collate(self, rows: list[Any]) -> dict[str, Any]: ...
    def save(self, model: torch.nn.Module, directory: Path) -> None: ...
    def load(self, model: torch.nn.Module, directory: Path) -> None: ...


class ListDataset(Dataset):
    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Any:
        return self.rows[i]


class RagkitTrainer(Trainer):
    """compute_loss asks the model; saving and loading go through the architecture."""

    def __init__(self, *args: Any, arch: Arch, train_config: TrainConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arch = arch
        self.train_config = train_config
        self.tokens = 0
        # --profile: training-step and retrieval seconds, in all and since the last log line
        self.retrieval_profile = Profile() if getattr(self.model, "profile_retrieval", False) else None

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        out = model(**inputs)
        self.tokens += int(out.get("tokens", 0))
        return (out["loss"], out) if return_outputs else out["loss"]

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        if self.retrieval_profile is None:
            return super().training_step(model, inputs, num_items_in_batch)
        began = time.perf_counter()
        retrieved = _retrieval_seconds(model)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.retrieval_profile.add(time.perf_counter() - began, _retrieval_seconds(model) - retrieved)
        return loss

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Validation is the architecture's (RAG decodes its --eval-data and scores the answers), not
        Trainer's loss loop; the metrics are logged (metrics.jsonl, the tracker) and pick the best checkpoint."""
        model = self.accelerator.unwrap_model(self.model)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in self.arch.validate(model, self.train_config).items()}
        self.log(metrics)
        return metrics

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.retrieval_profile is not None and "loss" in logs:
            logs.update(self.retrieval_profile.since_last_log(self.state.global_step))
        super().log(logs, *args, **kwargs)


    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Sharded runs (FSDP, DeepSpeed ZeRO-3) gather the full weights on every rank, frozen ones too (a
        LoRA run's query encoder, say), and rank 0 saves them through the architecture in the usual
        formats; Trainer's own paths hand `_save` a state dict instead, without ZeRO-3's frozen weights."""
        if getattr(self, "is_fsdp_enabled", False):
            gathered: Any = fsdp_full_parameters(self.accelerator.unwrap_model(self.model))
        elif zero3_enabled():
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)
        else:
            return super().save_model(output_dir, _internal_call)
        with gathered:
            if self.args.should_save:
                self._save(output_dir)
        self.accelerator.wait_for_everyone()
        return None

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        directory = Path(output_dir or self.args.output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.arch.save(self.accelerator.unwrap_model(self.model), directory)
        write_json(directory / CONFIG_FILE, self.train_config.to_json())
        torch.save(self.args, directory / "training_args.bin")

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Trainer writes checkpoint-N; once every rank has, rank 0 marks it complete, then rotates. A full disk
        removes the incomplete checkpoint and names the run folder; the last complete one stays to resume from."""
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            shutil.rmtree(folder, ignore_errors=True)
            raise disk_full(self.args.output_dir, "the incomplete checkpoint was removed, the last complete one is "
                            "kept to resume from", writing=folder.name,
                            hint="Free space there and rerun with --resume.") from None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            mark_complete(folder, self.state.global_step)
            best = self.state.best_global_step  # validation's best so far is never rotated away
            rotate(Path(self.args.output_dir), self.train_config.save_total_limit,
                   protect=Path(self.args.output_dir) / f"checkpoint-{best}" if best else None)
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        with _unreadable_checkpoint(resume_from_checkpoint, "weights"):
            self.arch.load(self.accelerator.unwrap_model(model or self.model), Path(resume_from_checkpoint))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        with _unreadable_checkpoint(checkpoint, "optimizer or scheduler state"):
            super()._load_optimizer_and_scheduler(checkpoint)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        with _unreadable_checkpoint(checkpoint, "RNG state"):
            super()._load_rng_state(checkpoint)



class Profile:
    """What --profile reports: retrieval seconds per optimizer step and their share of the training step
    (forward + backward), since the last log line and over the run."""

    def __init__(self) -> None:
        self.step_s = self.retrieval_s = 0.0
        self._logged = (0.0, 0.0, 0)

    def add(self, step_s: float, retrieval_s: float) -> None:
        self.step_s += step_s
        self.retrieval_s += retrieval_s

    def since_last_log(self, global_step: int) -> dict[str, float]:
        step_s, retrieval_s, at = self._logged
        steps = max(1, global_step - at)
        self._logged = (self.step_s, self.retrieval_s, global_step)
        spent, retrieving = self.step_s - step_s, self.retrieval_s - retrieval_s
        return {"retrieval_s": retrieving / steps, "retrieval_share": retrieving / spent if spent else 0.0}

    def totals(self) -> dict[str, float]:
        return {"retrieval_s": self.retrieval_s,
                "retrieval_share": self.retrieval_s / self.step_s if self.step_s else 0.0}


def _retrieval_seconds(model: Any) -> float:
    inner = getattr(model, "module", model)  # DDP wraps the model
    return float(getattr(inner, "retrieval_s", 0.0))


@contextlib.contextmanager
def _unreadable_checkpoint(checkpoint: str | None, part: str) -> Iterator[None]:
    """A checkpoint that passed its manifest but still does not load is exit 4 naming it, not a traceback."""
    try:
        yield
    except RagkitError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        raise ResourceError(f"cannot load the {part} of checkpoint {checkpoint}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": "),
                            hint="move the folder aside to resume from the checkpoint before it") from exc


@contextlib.contextmanager
def fsdp_full_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Collective on every rank: inside, rank 0's `model` holds its full, plain parameters (FSDP shards
    them as DTensors), so the architectures save in their usual formats; afterwards the shards are back.
    Parameters are swapped by identity, so tied weights stay tied."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    replacement: dict[int, torch.nn.Parameter] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if name in full and id(parameter) not in replacement:
            replacement[id(parameter)] = torch.nn.Parameter(full[name], requires_grad=parameter.requires_grad)
    swapped = []
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None and id(parameter) in replacement:
                swapped.append((module, name, parameter))
                module._parameters[name] = replacement[id(parameter)]
    try:
        yield
    finally:
        for module, name, parameter in swapped:
            module._parameters[name] = parameter


def zero3_enabled() -> bool:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


@contextlib.contextmanager
def loading_outside_zero_init(args: TrainingArguments) -> Iterator[None]:
    """Build the models with their full weights even under ZeRO-3: transformers would otherwise load each
    one partitioned (zero.Init), a collective on every rank that the architectures' own steps after loading
    (fingerprints, resizing, LoRA) cannot run on. DeepSpeed partitions the whole model when training starts."""
    config = getattr(args, "hf_deepspeed_config", None)
    if config is None or not zero3_enabled():
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(config)


class MetricsJsonl(TrainerCallback):
    """Every log line (loss, lr, grad norm, ...) appended to OUTPUT/metrics.jsonl."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is not None and state.is_world_process_zero:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


class RichProgress(TrainerCallback):
    """A progress bar with loss and learning rate on stderr (Trainer's tqdm bars are turned off)."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.task: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from ragkit.console import progress

        if state.is_world_process_zero:
            self.bar = progress()
            self.bar.start()
            self.task = self.bar.add_task("train", total=state.max_steps, completed=state.global_step, rate="")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.bar is not None and logs and "loss" in logs:
            self.bar.update(self.task, rate=f"loss {logs['loss']:.4f} lr {logs.get('learning_rate', 0):.2e}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def training_arguments(config: TrainConfig, use_cpu: bool, validation: tuple[int, str] | None = None) -> TrainingArguments:
    """Trainer's arguments; `validation` (every N steps, the metric that picks the best checkpoint) comes
    from an architecture that validates (RAG with --eval-data)."""
    scheduler = {"polynomial": "polynomial", "cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
    return TrainingArguments(
        output_dir=config.output,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        lr_scheduler_type=scheduler[config.scheduler],
        warmup_steps=config.warmup_ratio or config.warmup_steps,  # transformers 5: a float in [0, 1) is a ratio
        adam_epsilon=config.adam_epsilon,
        max_grad_norm=config.max_grad_norm,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        bf16=config.precision == "bf16",
        fp16=config.precision == "fp16",
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        save_total_limit=None,  # ragkit rotates, after the new checkpoint is marked complete (checkpoints.py)
        save_strategy="steps",
        report_to=[] if config.report_to == "none" else [config.report_to],
        remove_unused_columns=False,
        disable_tqdm=True,
        use_cpu=use_cpu,
        dataloader_num_workers=0,
        deepspeed=config.deepspeed or None,
        fsdp=config.fsdp or None,  # FSDP's options live in fsdp_config (transformers deprecates option strings)
        fsdp_config=config.fsdp_config or None,
        **({"eval_strategy": "steps", "eval_steps": validation[0], "metric_for_best_model": validation[1],
            "greater_is_better": True} if validation else {}),
    )


@dataclass
class CostReport:
    wall_s: float
    steps: int
    examples_per_s: float
    tokens_per_s: float  # generator tokens read (prompts with their passages + answers), all K passages
    peak_cpu_memory_mib: float
    peak_gpu_memory_mib: float | None
    trainable_params: int
    total_params: int
    final_loss: float | None
    processes: int = 1  # training processes (torchrun / accelerate ranks); examples and tokens are summed over them
    gpu_hours: float = 0.0  # wall time x GPUs used
    gpu_cost: float | None = None  # gpu_hours x --gpu-hour-price, when a price is given
    best_checkpoint: str | None = None  # with validation: the checkpoint of the best --eval-metric
    best_metric: dict[str, float] | None = None
    test_metrics: dict[str, float] | None = None  # --predict-data: the final model's test EM / F1 / match
    retrieval_s: float | None = None  # --profile: seconds retrieving, over the run (this process)
    retrieval_share: float | None = None  # --profile: their share of the training steps' time

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def train(config: TrainConfig, arch: Arch, *, resume: bool = False) -> CostReport:
    """Run one training job; returns (and writes) its cost report."""
    from ragkit.models.encoder import resolve_device

    device = resolve_device(config.device)
    if config.fsdp and not device.startswith("cuda"):
        from ragkit.console import info

        # seen with transformers 5.24: on the CPU, Trainer quietly trains with DDP instead
        info("warning: --fsdp shards over CUDA GPUs; on the CPU the ranks train with DDP (full copies)")
    _check_tracker(config.report_to)
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / CONFIG_FILE, config.to_json())
    _tracker_location(config.report_to, output)
    start = None
    if resume:  # chosen (and checked) before any model loads
        from ragkit.console import info

        start = str(resume_checkpoint(output, info))
    schedule = arch.validation_schedule(config) if hasattr(arch, "validation_schedule") else None
    args = training_arguments(config, use_cpu=device == "cpu", validation=schedule)
    # Under torchrun / accelerate, rank 0 builds first (GGUF conversion, RETRO's work folder, index copies)
    # while the other ranks wait, then finds its caches current; the filesystem is assumed shared.
    with args.main_process_first(local=False, desc="building the model and its data"), \
            loading_outside_zero_init(args):
        # --seed decides the initial weights too (RETRO from scratch, LoRA's A matrices), the same on
        # every rank; Trainer only seeds after the model exists
        set_seed(config.seed)
        model = arch.build(config, device)
        dataset = arch.dataset(config)
    trainer = RagkitTrainer(
        model=model, args=args, train_dataset=dataset,
        eval_dataset=arch.validation_set(config) if args.eval_strategy != "no" else None,
        data_collator=arch.collate, arch=arch, train_config=config,
        callbacks=[MetricsJsonl(output / "metrics.jsonl"), RichProgress(),
                   *(arch.callbacks(config) if hasattr(arch, "callbacks") else [])],
    )
    trainer.remove_callback(PrinterCallback)  # it prints logs to stdout, which belongs to data
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=start)
    wall = time.perf_counter() - began
    trainer.save_model(str(output / "final"))
    test_metrics = None
    if hasattr(arch, "predict") and getattr(config, "predict_data", "") and trainer.is_world_process_zero():
        test_metrics = arch.predict(trainer.accelerator.unwrap_model(trainer.model), config, output)
    if config.report_to == "wandb":
        _finish_wandb()
    steps = result.global_step
    world = trainer.args.world_size  # torchrun / accelerate processes, each with its own batch
    examples = steps * config.batch_size * config.grad_accum * world
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    tokens, peak_cpu, peak_gpu = _across_processes(trainer, float(trainer.tokens),
                                                   resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, peak_gpu)
    report = CostReport(
        wall_s=wall,
        steps=steps,
        examples_per_s=examples / wall if wall else 0.0,
        tokens_per_s=tokens / wall if wall else 0.0,
        peak_cpu_memory_mib=peak_cpu,
        peak_gpu_memory_mib=peak_gpu,
        trainable_params=sum(parameter_count(p) for p in model.parameters() if p.requires_grad),
        total_params=sum(parameter_count(p) for p in model.parameters()),
        final_loss=result.training_loss,
        processes=world,
    )
    report.test_metrics = test_metrics
    if trainer.state.best_global_step:
        report.best_checkpoint = str(output / f"checkpoint-{trainer.state.best_global_step}")
        report.best_metric = {args.metric_for_best_model: trainer.state.best_metric}
    if trainer.retrieval_profile is not None:
        report.retrieval_s, report.retrieval_share = trainer.retrieval_profile.totals().values()
    gpus = world if device.startswith("cuda") else 0
    report.gpu_hours = wall * gpus / 3600
    report.gpu_cost = report.gpu_hours * config.gpu_hour_price if config.gpu_hour_price > 0 else None
    if not trainer.is_world_process_zero():
        return report
    write_json(output / "cost_report.json", report.to_json())
    return report


def _across_processes(trainer: Any, tokens: float, peak_cpu_mib: float,
                      peak_gpu_mib: float | None) -> tuple[float, float, float | None]:
    """Tokens summed, peak memories maxed over the ranks of a multi-process run (one process: as given)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return tokens, peak_cpu_mib, peak_gpu_mib
    device = trainer.args.device  # gloo reduces CPU tensors, NCCL CUDA ones
    summed = torch.tensor([tokens], dtype=torch.float64, device=device)
    peaks = torch.tensor([peak_cpu_mib, -1.0 if peak_gpu_mib is None else peak_gpu_mib], dtype=torch.float64, device=device)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    gpu = float(peaks[1].item())
    return float(summed.item()), float(peaks[0].item()), None if gpu < 0 else gpu


def parameter_count(parameter: Any) -> int:
    """Model parameters a tensor holds: bitsandbytes packs 4-bit weights two (or more) to a storage
    element, so numel() would halve a QLoRA model's size in the cost report."""
    if getattr(parameter, "ds_numel", None):  # partitioned by DeepSpeed ZeRO-3: the full size
        return int(parameter.ds_numel)
    if type(parameter).__name__ == "Params4bit":
        storage = getattr(parameter, "quant_storage", None)
        return parameter.numel() * 2 * (storage.itemsize if storage is not None else 1)
    return parameter.numel()


def _tracker_location(tracker: str, output: Path) -> None:
    """MLflow logs into the run folder unless MLFLOW_TRACKING_URI says otherwise, never into the working
    directory (MLflow 3's default is ./mlflow.db): OUTPUT/mlflow.db when SQLAlchemy is there (full
    `mlflow`), else the file store OUTPUT/mlruns (`mlflow-skinny`)."""
    import importlib.util
    import os

    if tracker == "wandb":
        _wandb_location(output)
        return
    if tracker != "mlflow" or os.environ.get("MLFLOW_TRACKING_URI"):
        return
    if importlib.util.find_spec("sqlalchemy") is not None:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{(output / 'mlflow.db').resolve()}"
    else:
        os.environ["MLFLOW_TRACKING_URI"] = (output / "mlruns").resolve().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def _wandb_location(output: Path) -> None:
    """W&B writes its run folder under OUTPUT/wandb (not the working directory) unless WANDB_DIR says where,
    into project "ragkit" unless WANDB_PROJECT names one, and offline when no API key is set: a training
    run never stops at a login prompt. `wandb sync OUTPUT/wandb/offline-run-*` uploads it later."""
    import os

    from ragkit.console import info

    os.environ.setdefault("WANDB_DIR", str(output.resolve()))
    os.environ.setdefault("WANDB_PROJECT", "ragkit")
    (Path(os.environ["WANDB_DIR"]) / "wandb").mkdir(parents=True, exist_ok=True)
    if not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"
        info("--tracker wandb: no WANDB_API_KEY, logging offline under "
             f"{Path(os.environ['WANDB_DIR']) / 'wandb'} (upload later with `wandb sync`)")


def _finish_wandb() -> None:
    """transformers' W&B callback leaves its run open until the process exits; ragkit.fit called from Python
    (or a test) would never write the run's summary. Finish it here."""
    import wandb

    if wandb.run is not None:
        wandb.finish()


def _check_tracker(tracker: str) -> None:
    import importlib.util

    from ragkit.errors import ResourceError

    if tracker != "none" and importlib.util.find_spec(tracker) is None:
        raise ResourceError(f"--tracker {tracker}: the {tracker} package is not installed",
                            hint=f"pip install {tracker}")
