"""RETRO as a trainer architecture (`--arch retro`): a folder of text in, a RETRO model out.

`build` runs the pipeline (ragkit.archs.retro.corpus.prepare: chunks, embeddings, index, neighbours, cached in
--workdir) and creates the model from the size flags. Checkpoints:

    CHECKPOINT/model/       RetroModel.save_pretrained + the tokenizer (AutoModel opens it once ragkit is imported)
    CHECKPOINT/retro.json   the work folder, tokenizer fingerprint, embedder and chunking it was trained with
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ragkit.errors import ResourceError, UsageError
from ragkit.io.atomic import write_json
from ragkit.archs.retro.model import RetroConfig, RetroModel
from ragkit.archs.retro import corpus as C
from ragkit.archs.retro.pipeline import RetroDataConfig, end_of_document_id
from ragkit.train.config import TrainConfig

RETRO_FILE = "retro.json"


class RetroForTraining(torch.nn.Module):
    """forward -> {"loss", "tokens"} for the trainer; `tokens` counts the predicted (non-padding) tokens."""

    def __init__(self, model: RetroModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, retrieved: torch.Tensor | None = None) -> dict[str, Any]:
        out = self.model(input_ids=input_ids, retrieved=retrieved, labels=labels)
        return {"loss": out.loss, "tokens": int(labels.ne(-100).sum())}


def parse_cross_attn_layers(text: str, depth: int) -> list[int] | None:
    """'' -> the model's default; 'none' -> no CCA layer (a decoder-only baseline); '1,4' -> [1, 4]."""
    text = text.strip().lower()
    if not text:
        return None
    if text == "none":
        return []
    try:
        layers = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"--retro-cross-attn-layers {text}: expected comma-separated layer numbers or 'none'") from None
    if any(not 0 <= i < depth for i in layers):
        raise UsageError(f"--retro-cross-attn-layers {text}: layers are 0-indexed and below --retro-dec-depth {depth}")
    return layers


def data_config(config: TrainConfig) -> RetroDataConfig:
    from ragkit.index.spec import parse_memory

    return RetroDataConfig(
        data=config.data, workdir=config.workdir, glob=config.glob, tokenizer=config.tokenizer,
        embedder=config.embedder or "minilm", index_spec=config.index_spec, chunk_size=config.chunk_size,
        seq_len=config.seq_len, num_neighbors=config.num_neighbors, extra_neighbors=config.extra_neighbors,
        reprocess=config.reprocess or os.environ.get("REPROCESS", "") not in ("", "0"),  # RETRO-pytorch's switch
        device=config.device if config.device != "auto" else None, max_chunks=config.max_chunks,
        max_index_memory=parse_memory(config.max_index_memory) if config.max_index_memory else None)


def model_config(config: TrainConfig, vocab_size: int) -> RetroConfig:
    return RetroConfig(
        vocab_size=vocab_size, dim=config.retro_dim, enc_dim=config.retro_enc_dim or None, dec_depth=config.retro_dec_depth,
        enc_depth=config.retro_enc_depth, heads=config.retro_heads, dim_head=config.retro_dim_head,
        chunk_size=config.chunk_size, num_neighbors=config.num_neighbors, neighbor_len=2 * config.chunk_size,
        cross_attn_layers=parse_cross_attn_layers(config.retro_cross_attn_layers, config.retro_dec_depth),
        attn_dropout=config.attn_dropout, ff_dropout=config.ff_dropout, deepnet=config.retro_deepnet,
        pad_token_id=None)


class RetroArch:
    def __init__(self) -> None:
        self.prepared: C.Prepared | None = None

    def build(self, config: TrainConfig, device: str) -> RetroForTraining:
        self.config = config
        data = data_config(config)
        # --reprocess rebuilds once: the other ranks of a torchrun job build after rank 0 (the trainer
        # runs it first) and must then read its work folder, not rebuild it under its feet
        data.reprocess = data.reprocess and int(os.environ.get("RANK", "0")) == 0
        self.prepared = C.prepare(data)
        check_checkpoint_tokenizer(Path(config.output), self.prepared.tokenizer_fingerprint)
        model = RetroModel(model_config(config, len(self.prepared.tokenizer)))
        self.uses_retrieval = bool(model.config.cross_attn_layers)
        return RetroForTraining(model).to(device)

    def dataset(self, config: TrainConfig) -> C.RetroSequences:
        assert self.prepared is not None
        corpus = self.prepared.corpus
        return C.RetroSequences(corpus, corpus, seq_len=config.seq_len, pad_id=end_of_document_id(self.prepared.tokenizer),
                                with_neighbours=self.uses_retrieval, max_seqs=config.max_seqs or None)

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return C.collate(rows)

    def save(self, model: RetroForTraining, directory: Path) -> None:
        assert self.prepared is not None
        model.model.save_pretrained(directory / "model")
        self.prepared.tokenizer.save_pretrained(directory / "model")
        write_json(directory / RETRO_FILE, {
            "workdir": str(Path(self.config.workdir).resolve()), "tokenizer": self.config.tokenizer,
            "tokenizer_fingerprint": self.prepared.tokenizer_fingerprint,
            "embedder": self.config.embedder or "minilm", "chunk_size": self.config.chunk_size,
            "seq_len": self.config.seq_len, "num_neighbors": self.config.num_neighbors})

    def load(self, model: RetroForTraining, directory: Path) -> None:
        from safetensors.torch import load_file

        weights = directory / "model" / "model.safetensors"
        if not weights.exists():
            raise ResourceError(f"{directory}: no RETRO weights to resume from")
        if self.prepared is not None:
            check_checkpoint_tokenizer(directory, self.prepared.tokenizer_fingerprint, recurse=False)
        model.model.load_state_dict(load_file(weights))  # strict: a checkpoint of another size fails loudly


def check_checkpoint_tokenizer(directory: Path, fingerprint: str, *, recurse: bool = True) -> None:
    """A checkpoint trained on ids of one tokenizer must not continue on ids of another."""
    import json

    candidates = [directory / RETRO_FILE] if not recurse else sorted(directory.glob(f"checkpoint-*/{RETRO_FILE}"))
    for path in candidates:
        if path.exists():
            built = json.loads(path.read_text(encoding="utf-8")).get("tokenizer_fingerprint")
            if built and built != fingerprint:
                raise ResourceError(f"{path}: this run was trained with another tokenizer (fingerprint {built[:12]}) "
                                    f"than the work folder's ({fingerprint[:12]})",
                                    hint="Resume with the work folder it was trained on, or start a new --output.")
