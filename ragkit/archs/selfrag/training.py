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
from ragkit.models.lm import LoraSettings, add_lora, load_trained_weights
from ragkit.train.config import TrainConfig
from ragkit.archs.selfrag.data import collate, encode, read_instruction_data
from ragkit.train.trainer import ListDataset

DEFAULT_LORA_R = 8


class CausalLMForTraining(torch.nn.Module):
    """The trainer's interface over a causal LM: forward -> {"loss", "tokens"}.

    With a teacher (`--distill-from`), the loss is alpha * cross-entropy + (1 - alpha) * T^2 * KL(teacher_T ||
    student_T) over the positions that carry labels (Hinton et al. 2015); the teacher never trains."""

    def __init__(self, model: Any, tokenizer: Any, *, teacher: Any = None, alpha: float = 0.5,
                 temperature: float = 2.0) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.teacher = [teacher] if teacher is not None else []  # a list: not a submodule, never saved or trained
        self.alpha, self.temperature = alpha, temperature

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        loss = out.loss
        if self.teacher:
            with torch.no_grad():
                teacher_logits = self.teacher[0](input_ids=input_ids, attention_mask=attention_mask).logits
            loss = self.alpha * loss + (1 - self.alpha) * distillation_kl(out.logits, teacher_logits, labels,
                                                                          self.temperature)
        return {"loss": loss, "tokens": int(attention_mask.sum())}


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over labelled positions of KL(softmax(teacher/T) || softmax(student/T)), next-token aligned."""
    mask = labels[:, 1:] != -100  # logits at t predict token t+1, as the cross-entropy does
    s = torch.log_softmax(student[:, :-1].float() / temperature, dim=-1)[mask]
    t = torch.log_softmax(teacher[:, :-1].float() / temperature, dim=-1)[mask]
    if s.numel() == 0:
        return student.sum() * 0.0
    kl = torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")
    return kl * temperature**2


class SelfRagArch:
    def __init__(self, *, critic: bool) -> None:
        self.critic = critic
        self.tokenizer: Any = None

    def build(self, config: TrainConfig, device: str) -> CausalLMForTraining:
        from ragkit.models.generator import Generator
        from ragkit.archs.selfrag.tokens import add_reflection_tokens

        generator = Generator(config.generator, device=device, dtype="float32" if config.quantize == "none" else "auto",
                              quantize=config.quantize, dropout=config.dropout,
                              attention_dropout=config.attention_dropout)
        if generator.is_seq2seq:
            raise ResourceError(f"{config.generator}: Self-RAG trains a causal (decoder-only) model")
        model, tokenizer = generator.model, generator.tokenizer
        tokenizer.padding_side = "right"
        new_ids = add_reflection_tokens(tokenizer, model)
        rank = DEFAULT_LORA_R if config.lora_r < 0 else config.lora_r
        if rank > 0:
            model = add_lora(model, LoraSettings.from_config(config, rank), trainable_token_indices=new_ids)
        self.tokenizer = tokenizer
        self.base = _portable_name(config.generator)
        teacher = _load_teacher(config, tokenizer, device) if config.distill_from else None
        return CausalLMForTraining(model.to(device), tokenizer, teacher=teacher, alpha=config.distill_alpha,
                                   temperature=config.distill_temperature)

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
        load_trained_weights(model.model, directory / "model", "model")


def generator_arch() -> SelfRagArch:
    return SelfRagArch(critic=False)


def critic_arch() -> SelfRagArch:
    return SelfRagArch(critic=True)


def _load_teacher(config: TrainConfig, student_tokenizer: Any, device: str) -> Any:
    """The teacher, frozen; it must share the student's vocabulary (reflection tokens included)."""
    from ragkit.archs.selfrag.loading import load_causal_lm

    teacher, tokenizer = load_causal_lm(config.distill_from, device=device, dtype="float32", merge_lora=True)
    if tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise ResourceError(f"--distill-from {config.distill_from}: its vocabulary differs from the student's",
                            hint="Distil between models of one tokenizer family (with the same added tokens).")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _portable_name(name: str) -> str:
    p = Path(name)
    return str(p.resolve()) if p.exists() else name
