"""Loading a Self-RAG model: a plain HF folder or hub id, or a `ragkit train --arch selfrag` LoRA checkpoint
(base model + adapter that carries the reflection-token embedding rows)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ragkit.errors import ResourceError


def checkpoint_model_dir(path: str | Path) -> Path | None:
    """The model folder inside a training checkpoint (CHECKPOINT/model), or the folder itself."""
    p = Path(path)
    for candidate in (p / "model", p):
        if (candidate / "adapter_config.json").exists() or (candidate / "config.json").exists():
            return candidate
    return None


def load_causal_lm(name: str, *, device: str | None = None, dtype: str = "auto",
                   trust_remote_code: bool = False, merge_lora: bool = False, quantize: str = "none") -> tuple[Any, Any]:
    """(model, tokenizer) from a hub id, folder, GGUF or alias, or from a LoRA adapter folder whose
    tokenizer has grown (the base is resized to it before the adapter loads).

    `quantize`: 4bit/8bit load the base through bitsandbytes; merging and int8 follow ready_for_inference."""
    from ragkit.models.encoder import resolve_device
    from ragkit.models.generator import Generator, _bitsandbytes_kwargs, _torch_dtype
    from ragkit.models.quantize import ready_for_inference

    folder = checkpoint_model_dir(name) if Path(name).exists() else None
    if folder is None or not (folder / "adapter_config.json").exists():
        generator = Generator(str(folder or name), device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                              quantize=quantize)
        return generator.model, generator.tokenizer
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragkit.models.registry import materialize, missing_model_error, resolve

    base_name = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    ref = resolve(base_name)
    device = resolve_device(device)
    bitsandbytes = _bitsandbytes_kwargs(quantize, device)
    try:
        base = AutoModelForCausalLM.from_pretrained(materialize(ref), dtype=_torch_dtype(dtype, device),
                                                    trust_remote_code=trust_remote_code, **bitsandbytes)
    except (OSError, ValueError) as exc:
        raise missing_model_error(ref, exc) from exc
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if len(tokenizer) != base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model = PeftModel.from_pretrained(base, folder)
    if not bitsandbytes:  # bitsandbytes placed the weights already (and refuses .to)
        model.to(device)
    model = ready_for_inference(model.eval(), quantize, device, merge=merge_lora)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_selfrag_decoder(name: str, config: Any, *, device: str | None = None, dtype: str = "auto",
                         trust_remote_code: bool = False, backend: str = "transformers", quantize: str = "none") -> Any:
    from ragkit.models.selfrag.decoding import SelfRagDecoder, VLLMSelfRagDecoder

    if config is None:
        raise ResourceError("--arch selfrag needs its decoding options")
    if backend == "vllm":
        from ragkit.models.generator import refuse_quantize_with_vllm

        refuse_quantize_with_vllm(quantize)
        from ragkit.models.generator import VLLMGenerator

        folder = checkpoint_model_dir(name)
        if folder is not None and (folder / "adapter_config.json").exists():
            raise ResourceError(f"{name}: a LoRA checkpoint; vLLM needs a merged model",
                                hint=f"ragkit export {name} -o MERGED, then --model MERGED.")
        return VLLMSelfRagDecoder(VLLMGenerator(name, dtype=dtype, trust_remote_code=trust_remote_code).llm, config,
                                  name=name)
    model, tokenizer = load_causal_lm(name, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                      merge_lora=True, quantize=quantize)
    return SelfRagDecoder(model, tokenizer, config, name=name)
