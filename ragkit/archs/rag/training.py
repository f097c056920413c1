"""RAG as a trainer architecture: pairs -> RagForTraining; checkpoints as plain HF / peft / ST folders.

    CHECKPOINT/generator/        save_pretrained (full weights, or the LoRA adapter) + tokenizer
    CHECKPOINT/query_encoder/    a sentence-transformers folder
    CHECKPOINT/rag_config.json   RagModelConfig
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ragkit.errors import ResourceError
from ragkit.io.atomic import write_json
from ragkit.models.lm import LoraSettings, load_trained_weights
from ragkit.archs.rag.model import RagForTraining, RagModelConfig, build_rag
from ragkit.train.config import TrainConfig
from ragkit.train.data import Pair, read_pairs
from transformers import TrainerCallback

from ragkit.train.trainer import ListDataset


def rag_model_config(config: TrainConfig) -> RagModelConfig:
    """The model a run trains. A transformers RAG checkpoint as --generator brings its own generator, question
    encoder (unless --query-encoder), loss (unless --loss) and prompt format (unless --rag-prompt)."""
    from ragkit.archs.rag.hf_checkpoint import hf_rag_class, import_hf_rag

    generator, query_encoder, loss, prompt = config.generator, config.query_encoder, config.loss, config.rag_prompt
    separators: dict[str, str] = {}
    if hf_rag_class(config.generator):
        imported = RagModelConfig(**json.loads((import_hf_rag(config.generator) / "rag_config.json").read_text()))
        generator, query_encoder = imported.generator, query_encoder or imported.query_encoder
        loss, prompt = loss or imported.loss, prompt or imported.prompt
        separators = {"title_sep": imported.title_sep, "doc_sep": imported.doc_sep}
    return RagModelConfig(
        generator=generator, query_encoder=query_encoder, index=config.index, n_docs=config.n_docs,
        end2end=config.end2end,
        loss=loss or "sequence", label_smoothing=config.label_smoothing, max_source_tokens=config.max_source_tokens,
        max_target_tokens=config.max_target_tokens, max_passage_words=config.max_passage_words,
        train_query_encoder=not config.freeze_query_encoder, dropout=config.dropout,
        attention_dropout=config.attention_dropout, prompt=prompt or "ragkit", **separators,
    )


def load_teacher(name: str, student: RagForTraining, device: str) -> Any:
    """The --distill-from generator, frozen: the same kind (causal or seq2seq) and vocabulary as the student's,
    since it reads the student's token ids and its distribution is compared token for token."""
    from ragkit.models.lm import load_lm

    loaded = load_lm(name, device=device, dtype="float32")
    if loaded.is_seq2seq != student.is_seq2seq or loaded.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise ResourceError(f"--distill-from {name}: its vocabulary (or its kind, causal or seq2seq) differs from "
                            "the generator's", hint="Distil between models of one tokenizer family.")
    loaded.model.eval()
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    return loaded.model


def decode_and_score(model: RagForTraining, examples: list[Any], config: TrainConfig,
                     max_new_tokens: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Decode questions with the model as it is now (RAG-Token greedy for --loss token, RAG-Sequence fast
    decoding otherwise) and score each answer (SQuAD EM, token F1, Self-RAG match): (means, per-example rows)."""
    import time

    import torch

    from ragkit.archs.rag.decoding import decode
    from ragkit.eval.tasks import get_task

    task = get_task("qa")
    batch = config.eval_batch_size or config.batch_size
    mode = "token" if (config.loss or "sequence") == "token" else "sequence-fast"
    was_training = model.training
    model.eval()
    began = time.perf_counter()
    totals = {"em": 0.0, "f1": 0.0, "match": 0.0}
    rows = []
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            block = examples[i:i + batch]
            for example, answer in zip(block, decode(model, [e.question for e in block], mode=mode,
                                                     max_new_tokens=max_new_tokens)):
                scores = {k: v for k, v in task.score(example, answer.text).items() if k in totals}
                for name, value in scores.items():
                    totals[name] += value
                rows.append({"id": example.id, "question": example.question, "output": answer.text,
                             "golds": example.golds, "passage_ids": [h.id for h in answer.hits], **scores})
    model.train(was_training)
    n = max(1, len(examples))
    return {**{k: v / n for k, v in totals.items()}, "n": float(len(examples)), "seconds": time.perf_counter() - began}, rows


class RagArch:
    def build(self, config: TrainConfig, device: str) -> RagForTraining:
        if not config.index:
            raise ResourceError("--index is required for --arch rag")
        if config.end2end:
            config.index = str(_own_index_copy(config.index, Path(config.output)))
        self.config = config
        lora = LoraSettings.from_config(config, config.lora_r) if config.lora_r > 0 else None
        searcher = None
        if config.distributed_retriever == "ray":
            from ragkit.retrieval.ray_retriever import RayIndexClient

            dirs = config.index.split(",") if config.shard_index else [config.index]
            mode = "shards" if config.shard_index else "replicas"
            searcher = RayIndexClient(dirs, mode=mode, num_workers=config.num_retrieval_workers,
                                      address=config.ray_address, cpus_per_worker=0.5,
                                      name=RayIndexClient.job_name(dirs, mode, config.num_retrieval_workers))
        model = build_rag(rag_model_config(config), device=device, lora=lora, searcher=searcher)
        model.profile_retrieval = config.profile  # the trainer reports model.retrieval_s under --profile
        if config.distill_from:
            model.teacher = [load_teacher(config.distill_from, model, device)]
            model.distill_alpha, model.distill_temperature = config.distill_alpha, config.distill_temperature
        return model

    def dataset(self, config: TrainConfig) -> ListDataset:
        return ListDataset(read_pairs(config.data))

    def validation_schedule(self, config: TrainConfig) -> tuple[int, str] | None:
        """(validate every N steps, the logged metric that picks the best checkpoint), with --eval-data."""
        if not config.eval_data:
            return None
        return config.eval_steps or config.save_steps, f"eval_{config.eval_metric}"

    def validation_set(self, config: TrainConfig) -> ListDataset:
        """--eval-data as QA examples (question + answers), the first --n-val of them; read once."""
        from ragkit.eval.tasks import get_task, load_examples

        if not hasattr(self, "_validation"):
            self._validation = load_examples(get_task("qa"), config.eval_data, config.n_val or None)
        return ListDataset(self._validation)

    def validate(self, model: RagForTraining, config: TrainConfig) -> dict[str, float]:
        """Decode the validation questions with the model as it is now and score the answers."""
        metrics, _ = decode_and_score(model, self.validation_set(config).rows, config,
                                      config.eval_max_new_tokens or config.max_target_tokens)
        return metrics

    def predict(self, model: RagForTraining, config: TrainConfig, output: Path) -> dict[str, float]:
        """--predict-data (finetune_rag's --do_predict): the final model's answers to the test questions,
        written to OUTPUT/test_predictions.jsonl with their scores; the means go in the cost report."""
        from ragkit.eval.tasks import get_task, load_examples
        from ragkit.io.atomic import atomic_open

        examples = load_examples(get_task("qa"), config.predict_data)
        metrics, rows = decode_and_score(model, examples, config,
                                         config.predict_max_new_tokens or config.max_target_tokens)
        with atomic_open(output / "test_predictions.jsonl") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        return metrics

    def collate(self, rows: list[Pair]) -> dict[str, Any]:
        return {"questions": [r.question for r in rows], "answers": [r.answer for r in rows]}

    def callbacks(self, config: TrainConfig) -> list[Any]:
        return [IndexRefresh(config.refresh_steps, config.refresh_shards)] if config.end2end else []

    def save(self, model: RagForTraining, directory: Path) -> None:
        model.generator.save_pretrained(directory / "generator")
        model.tokenizer.save_pretrained(directory / "generator")
        model.query_encoder.save(str(directory / "query_encoder"))
        if model.doc_encoder is not None:
            model.doc_encoder.save(str(directory / "doc_encoder"))
        write_json(directory / "rag_config.json", dataclasses.asdict(model.config))

    def load(self, model: RagForTraining, directory: Path) -> None:
        load_trained_weights(model.generator, directory / "generator", "generator")
        _load_encoder(model.query_encoder, directory / "query_encoder", "query encoder")
        if model.doc_encoder is not None:
            _load_encoder(model.doc_encoder, directory / "doc_encoder", "document encoder")


def _load_encoder(encoder: Any, folder: Path, what: str) -> None:
    """A saved sentence-transformers encoder's weights into the training one: the transformer's, and those of
    any later module with weights (a DPR encoder's projection, a Dense layer)."""
    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    if not weights.exists():
        raise ResourceError(f"{folder.parent}: no {what} weights to resume from")
    encoder[0].auto_model.load_state_dict(load_file(weights))
    modules = json.loads((folder / "modules.json").read_text()) if (folder / "modules.json").exists() else []
    for entry in modules:
        extra = folder / entry.get("path", "") / "model.safetensors"
        if entry.get("path") and extra.exists():
            encoder[int(entry["idx"])].load_state_dict(load_file(extra))


def _own_index_copy(index: str, output: Path) -> Path:
    """End-to-end training changes the index: it works on OUTPUT/index (made once, kept for --resume)."""
    import shutil

    from ragkit.index import Index

    target = output / "index"
    if not Index.exists(target):
        source = Index.open(index)
        staging = output / ".index-copy"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source.version_dir, staging / source.version_dir.name)
        (staging / "current").symlink_to(source.version_dir.name)
        staging.rename(target)
    return target


class IndexRefresh(TrainerCallback):
    """Every `every` steps, re-embed a 1/`shards` slice of the passages with the training document encoder and
    upsert the vectors into the run's index (a new atomic version), the next slice next time.

    The HF rag-end2end project re-encodes and rebuilds the whole index in side processes; here each refresh
    costs 1/shards of an encoding pass and reuses the index's own upsert."""

    def __init__(self, every: int, shards: int) -> None:
        self.every, self.shards = every, shards

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None or state.global_step % self.every != 0:
            return
        rag = getattr(model, "module", model)
        part = (state.global_step // self.every - 1) % self.shards  # from the step: the same after --resume
        refresh_slice(rag, part, self.shards, step=state.global_step)


def refresh_slice(rag: RagForTraining, part: int, parts: int, *, step: int) -> int:
    import numpy as np
    import torch

    from ragkit.index.encoder_info import EncoderInfo
    from ragkit.models.encoder import weights_fingerprint

    index = rag.index
    passages = [p for i, (_, p) in enumerate(index.iter_passages()) if i % parts == part]
    if not passages:
        return 0
    encoder = rag.doc_encoder
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        vectors = np.asarray(encoder.encode([p.embedding_text() for p in passages], batch_size=64,
                                            convert_to_numpy=True, normalize_embeddings=index.encoder.normalize,
                                            show_progress_bar=False), dtype=np.float32)
    encoder.train(was_training)
    built = index.encoder
    info = EncoderInfo(built.name, built.dim, built.normalize, built.max_seq_length, weights_fingerprint(encoder),
                       built.pooling)
    index.upsert(passages, vectors, info, adopt_encoder={"step": step, "slice": f"{part + 1}/{parts}"})
    return len(passages)
