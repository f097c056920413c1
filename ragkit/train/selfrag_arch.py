"""Self-RAG generator and critic as trainer architectures (`--arch selfrag`, `--arch selfrag-critic`).

Both are a causal LM with the reflection tokens added; LoRA by default (rank 8), with the new tokens'
embedding rows trained and saved in the adapter (peft `trainable_token_indices`), so that
`PeftModel.from_pretrained` on the resized base restores them. Checkpoints:

    CHECKPOINT/model/          save_pretrained (adapter or full weights) + the grown tokenizer
    CHECKPOINT/selfrag.json    {"role": "generator" | "critic", "base": the base model as given}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ragkit.errors import ResourceError
from ragkit.io.atomic import write_json
from ragkit.train.config import TrainConfig
from ragkit.train.selfrag_data import collate, encode, read_instruction_data
from ragkit.train.trainer import ListDataset

DEFAULT_LORA_R = 8


class CausalLMForTraining(torch.nn.Module):
    """The trainer's interface over a causal LM: forward -> {"loss", "tokens"}."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        return {"loss": out.loss, "tokens": int(attention_mask.sum())}


class SelfRagArch:
    def __init__(self, *, critic: bool) -> None:
        self.critic = critic
        self.tokenizer: Any = None

    def build(self, config: TrainConfig, device: str) -> CausalLMForTraining:
        from ragkit.models.generator import Generator
        from ragkit.models.selfrag.tokens import add_reflection_tokens

        generator = Generator(config.generator, device=device, dtype="float32")
        if generator.is_seq2seq:
            raise ResourceError(f"{config.generator}: Self-RAG trains a causal (decoder-only) model")
        model, tokenizer = generator.model, generator.tokenizer
        tokenizer.padding_side = "right"
        new_ids = add_reflection_tokens(tokenizer, model)
        rank = DEFAULT_LORA_R if config.lora_r < 0 else config.lora_r
        if rank > 0:
            from peft import LoraConfig, get_peft_model

            targets = [t.strip() for t in config.lora_targets.split(",") if t.strip()] or "all-linear"
            model = get_peft_model(model, LoraConfig(
                r=rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, target_modules=targets,
                task_type="CAUSAL_LM", trainable_token_indices=new_ids or None,
            ))
        self.tokenizer = tokenizer
        self.base = _portable_name(config.generator)
        return CausalLMForTraining(model.to(device), tokenizer)

    def dataset(self, config: TrainConfig) -> ListDataset:
        if self.tokenizer is None:
            raise RuntimeError("build() must run before dataset()")
        examples = read_instruction_data(config.data)
        return ListDataset([encode(e, self.tokenizer, critic=self.critic, max_length=config.max_seq_length)
                            for e in examples])

    def collate(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        return collate(rows, self.tokenizer.pad_token_id)

    def save(self, model: CausalLMForTraining, directory: Path) -> None:
        target = directory / "model"
        # the adapter carries the new tokens' rows itself (trainable_token_indices): no full embedding copy
        kwargs = {"save_embedding_layers": False} if hasattr(model.model, "peft_config") else {}
        model.model.save_pretrained(target, **kwargs)
        model.tokenizer.save_pretrained(target)
        adapter_config = target / "adapter_config.json"
        if adapter_config.exists():  # name the base as the user gave it (an alias or hub id travels; a cache path does not)
            data = json.loads(adapter_config.read_text())
            data["base_model_name_or_path"] = self.base
            write_json(adapter_config, data)
        write_json(directory / "selfrag.json", {"role": "critic" if self.critic else "generator", "base": self.base})

    def load(self, model: CausalLMForTraining, directory: Path) -> None:
        from safetensors.torch import load_file

        target = directory / "model"
        if (target / "adapter_model.safetensors").exists():
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model.model, load_file(target / "adapter_model.safetensors"))
        elif (target / "model.safetensors").exists():
            model.model.load_state_dict(load_file(target / "model.safetensors"), strict=False)
        else:
            raise ResourceError(f"{directory}: no model weights to resume from")


def _portable_name(name: str) -> str:
    p = Path(name)
    return str(p.resolve()) if p.exists() else name
