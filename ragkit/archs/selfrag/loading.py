"""Loading a Self-RAG model: a plain HF folder or hub id, or a `ragkit train --arch selfrag` LoRA checkpoint
(base model + adapter that carries the reflection-token embedding rows)."""

from __future__ import annotations

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
    """(model, tokenizer) of a Self-RAG model: a hub id, folder, GGUF or alias, or a training checkpoint
    (CHECKPOINT/model, a LoRA adapter whose tokenizer grew the reflection tokens), through the one LM loader."""
    from ragkit.models.lm import load_lm

    folder = checkpoint_model_dir(name) if Path(name).exists() else None
    loaded = load_lm(folder or name, device=device, dtype=dtype, quantize=quantize,
                     trust_remote_code=trust_remote_code, merge_lora=merge_lora)
    return loaded.model, loaded.tokenizer


SELFRAG_LOGPROBS = 5000  # run_short_form.py / run_long_form_static.py: SamplingParams(logprobs=5000)


def load_selfrag_decoder(name: str, config: Any, *, device: str | None = None, dtype: str = "auto",
                         trust_remote_code: bool = False, backend: str = "transformers", quantize: str = "none",
                         tensor_parallel_size: int = 1) -> Any:
    from ragkit.archs.selfrag.decoding import SelfRagDecoder, VLLMSelfRagDecoder

    if backend == "vllm":
        from ragkit.models.generator import refuse_quantize_with_vllm

        refuse_quantize_with_vllm(quantize)
        from ragkit.models.generator import VLLMGenerator

        folder = checkpoint_model_dir(name)
        if folder is not None and (folder / "adapter_config.json").exists():
            raise ResourceError(f"{name}: a LoRA checkpoint; vLLM needs a merged model",
                                hint=f"ragkit export {name} -o MERGED, then --model MERGED.")
        from transformers import AutoTokenizer

        from ragkit.models.registry import materialize, resolve

        # the top-5000 log-probabilities per position that the reference scripts request, or the whole
        # vocabulary when it is smaller: every reflection token's log-probability is then present
        path = materialize(resolve(name))
        logprobs = min(SELFRAG_LOGPROBS, len(AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)))
        generator = VLLMGenerator(name, dtype=dtype, trust_remote_code=trust_remote_code,
                                  tensor_parallel_size=tensor_parallel_size, max_logprobs=logprobs)
        return VLLMSelfRagDecoder(generator.llm, config, name=name, logprobs=logprobs, device=generator.device)
    model, tokenizer = load_causal_lm(name, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                      merge_lora=True, quantize=quantize)
    return SelfRagDecoder(model, tokenizer, config, name=name)
