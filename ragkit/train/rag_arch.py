"""RAG as a trainer architecture: pairs -> RagForTraining; checkpoints as plain HF / peft / ST folders.

    CHECKPOINT/generator/        save_pretrained (full weights, or the LoRA adapter) + tokenizer
    CHECKPOINT/query_encoder/    a sentence-transformers folder
    CHECKPOINT/rag_config.json   RagModelConfig
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ragkit.errors import ResourceError
from ragkit.io.atomic import write_json
from ragkit.models.rag import RagForTraining, RagModelConfig, build_rag
from ragkit.train.config import TrainConfig
from ragkit.train.data import Pair, read_pairs
from ragkit.train.trainer import ListDataset


def rag_model_config(config: TrainConfig) -> RagModelConfig:
    return RagModelConfig(
        generator=config.generator, query_encoder=config.query_encoder, index=config.index, n_docs=config.n_docs,
        loss=config.loss, label_smoothing=config.label_smoothing, max_source_tokens=config.max_source_tokens,
        max_target_tokens=config.max_target_tokens, max_passage_words=config.max_passage_words,
        train_query_encoder=not config.freeze_query_encoder,
    )


class RagArch:
    def build(self, config: TrainConfig, device: str) -> RagForTraining:
        if not config.index:
            raise ResourceError("--index is required for --arch rag")
        lora = None
        if config.lora_r > 0:
            targets = [t.strip() for t in config.lora_targets.split(",") if t.strip()]
            lora = {"r": config.lora_r, "alpha": config.lora_alpha, "dropout": config.lora_dropout, "targets": targets}
        searcher = None
        if config.distributed_retriever == "ray":
            from ragkit.retrieval.ray_retriever import RayIndexClient

            dirs = config.index.split(",") if config.shard_index else [config.index]
            searcher = RayIndexClient(dirs, mode="shards" if config.shard_index else "replicas",
                                      num_workers=config.num_retrieval_workers, address=config.ray_address,
                                      cpus_per_worker=0.5)
        return build_rag(rag_model_config(config), device=device, lora=lora, searcher=searcher)

    def dataset(self, config: TrainConfig) -> ListDataset:
        return ListDataset(read_pairs(config.data))

    def collate(self, rows: list[Pair]) -> dict[str, Any]:
        return {"questions": [r.question for r in rows], "answers": [r.answer for r in rows]}

    def save(self, model: RagForTraining, directory: Path) -> None:
        model.generator.save_pretrained(directory / "generator")
        model.tokenizer.save_pretrained(directory / "generator")
        model.query_encoder.save(str(directory / "query_encoder"))
        write_json(directory / "rag_config.json", dataclasses.asdict(model.config))

    def load(self, model: RagForTraining, directory: Path) -> None:
        from safetensors.torch import load_file

        generator_dir = directory / "generator"
        if (generator_dir / "adapter_model.safetensors").exists():
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model.generator, load_file(generator_dir / "adapter_model.safetensors"))
        else:
            weights = generator_dir / "model.safetensors"
            if not weights.exists():
                raise ResourceError(f"{directory}: no generator weights to resume from")
            result = model.generator.load_state_dict(load_file(weights), strict=False)
            if result.unexpected_keys:
                raise ResourceError(f"{weights}: unexpected weights {result.unexpected_keys[:3]}")
        encoder_weights = directory / "query_encoder" / "model.safetensors"
        if not encoder_weights.exists():
            raise ResourceError(f"{directory}: no query encoder weights to resume from")
        model.query_encoder[0].auto_model.load_state_dict(load_file(encoder_weights))


def _selfrag(critic: bool) -> Any:
    from ragkit.train.selfrag_arch import SelfRagArch

    return lambda: SelfRagArch(critic=critic)


def _embedder() -> Any:
    from ragkit.train.embedder_arch import EmbedderArch

    return EmbedderArch()


ARCH_REGISTRY: dict[str, Any] = {"rag": RagArch, "selfrag": _selfrag(False), "selfrag-critic": _selfrag(True),
                                 "embedder": _embedder}


def arch_for(name: str) -> Any:
    from ragkit.errors import NotBuiltError

    if name not in ARCH_REGISTRY:
        issue = {"selfrag-critic": "#6", "selfrag": "#6", "retro": "#5", "embedder": "#7"}.get(name, "#4")
        raise NotBuiltError(f"`ragkit train --arch {name}` is not built yet (tracked in issue {issue}).")
    return ARCH_REGISTRY[name]()


