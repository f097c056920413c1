"""RETRO sampling with a key-value cache and retrieval at each chunk boundary.

RETRO-pytorch re-runs the whole model for every new token. Here each token costs one step over the cached
keys and values; when a token completes a chunk, its text is embedded, the work folder's index searched,
and the neighbours (chunk + continuation) encoded once and kept for the next m tokens.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ragkit.errors import ResourceError, UsageError
from ragkit.archs.retro.corpus import RetroCorpus
from ragkit.archs.retro.pipeline import chunk_texts, search_chunk_ids, start_of_document_id, tokenizer_fingerprint


class ChunkRetriever:
    """Neighbours of freshly written chunks: decode -> embed (the index's embedder) -> search -> tokens."""

    def __init__(self, corpus: RetroCorpus, index: Any, encoder: Any, tokenizer: Any, k: int) -> None:
        index.check_encoder(encoder.info)
        self.corpus, self.index, self.encoder, self.tokenizer, self.k = corpus, index, encoder, tokenizer, k
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """chunks (B, m) tokens -> (neighbour rows (B, K), neighbour tokens (B, K, 2m))."""
        began = time.perf_counter()
        self.calls += 1
        texts = chunk_texts(chunks, self.tokenizer, chunks.shape[1])
        rows = search_chunk_ids(self.index, self.encoder.encode(texts), self.k)
        self.seconds += time.perf_counter() - began
        return rows, self.corpus.neighbour_tokens(rows)


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0
    stop_at_eos: bool = True


@dataclass
class Sample:
    tokens: list[list[int]]  # new tokens per sample
    retrieved: list[dict[str, Any]] = field(default_factory=list)  # per chunk boundary: chunk, neighbour rows
    seconds: float = 0.0
    retrieval_seconds: float = 0.0


def _warpers(config: SamplingConfig) -> Any:
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList()
    if config.temperature > 0 and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k > 0:
        warpers.append(TopKLogitsWarper(config.top_k))
    if config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(config.top_p))
    return warpers


@torch.no_grad()
def sample(model: Any, prompt: list[int], config: SamplingConfig, retriever: ChunkRetriever | None = None,
           *, eos_id: int | None = None) -> Sample:
    """Continue `prompt` (token ids; at least one, e.g. the start-of-document token) num_samples times.

    Every completed chunk (of the prompt, then of the output) is retrieved for exactly once, when its last
    token is fed; without a retriever the model runs with no neighbours (its decoder alone)."""
    if not prompt:
        raise UsageError("a RETRO prompt needs at least one token (the start-of-document token)")
    m = model.config.chunk_size
    device = next(model.parameters()).device
    uses_cca = bool(model.config.cross_attn_layers) and retriever is not None
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    warpers = _warpers(config)
    b = config.num_samples
    ids = torch.tensor([prompt] * b, dtype=torch.long)
    out = Sample(tokens=[[] for _ in range(b)])
    began = time.perf_counter()
    retrieval_before = retriever.seconds if retriever is not None else 0.0  # its clock runs across prompts
    state = model.new_state()

    def neighbours_for(chunk_index: int, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
        if not uses_cca:
            return {}
        assert retriever is not None
        rows, found = retriever(tokens[:, chunk_index * m:(chunk_index + 1) * m].numpy())
        out.retrieved.append({"chunk": chunk_index, "neighbours": rows.tolist()})
        return {chunk_index: torch.as_tensor(found, device=device)}

    retrieved: dict[int, torch.Tensor] = {}
    for c in range(len(prompt) // m):  # the prompt's complete chunks; rows share the prompt: retrieve once
        retrieved.update({c: v.expand(b, *v.shape[1:]) for c, v in neighbours_for(c, ids[:1]).items()})
    logits = model.forward_cached(ids.to(device), state, retrieved)[:, -1]
    finished = torch.zeros(b, dtype=torch.bool)
    for step in range(config.max_new_tokens):
        scores = warpers(ids, logits.float().cpu())
        if config.temperature == 0:
            token = scores.argmax(-1)
        else:
            token = torch.multinomial(torch.softmax(scores, -1), 1, generator=generator).squeeze(-1)
        if eos_id is not None:
            token = torch.where(finished, torch.full_like(token, eos_id), token)
        for row in range(b):
            if not finished[row]:
                out.tokens[row].append(int(token[row]))
        ids = torch.cat([ids, token[:, None]], dim=1)
        if eos_id is not None and config.stop_at_eos:
            finished |= token.eq(eos_id)
            if finished.all():
                break
        if step == config.max_new_tokens - 1:
            break  # the last token is never fed: no forward, no retrieval for the chunk it completes
        length = ids.shape[1]
        retrieved = neighbours_for(length // m - 1, ids) if length % m == 0 else {}
        logits = model.forward_cached(token[:, None].to(device), state, retrieved)[:, -1]
    out.seconds = time.perf_counter() - began
    out.retrieval_seconds = retriever.seconds - retrieval_before if retriever is not None else 0.0
    return out


@dataclass
class LoadedRetro:
    model: Any
    tokenizer: Any
    corpus: RetroCorpus | None
    retriever: ChunkRetriever | None
    info: dict[str, Any]


def load_retro(checkpoint: str | Path, *, workdir: str | Path | None = None, device: str | None = None,
               retrieval: bool = True, k: int | None = None) -> LoadedRetro:
    """A `ragkit train --arch retro` checkpoint (OUTPUT/final or a checkpoint-N) with its work folder."""
    from transformers import AutoTokenizer

    from ragkit.models.encoder import Encoder, resolve_device
    from ragkit.archs.retro.model import RetroModel

    root = Path(checkpoint)
    meta_path = root / "retro.json"
    if not meta_path.exists():
        raise ResourceError(f"{root}: not a RETRO checkpoint (no retro.json)",
                            hint="Pass OUTPUT/final of `ragkit train --arch retro`.")
    info = json.loads(meta_path.read_text(encoding="utf-8"))
    from ragkit.models.registry import quiet_transformers

    quiet_transformers()
    model = RetroModel.from_pretrained(root / "model").to(resolve_device(device)).eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    corpus = retriever = None
    if retrieval and model.config.cross_attn_layers:
        from ragkit.index import Index
        from ragkit.archs.retro.pipeline import Manifest

        folder = Path(workdir or info["workdir"])
        if not (folder / "manifest.json").exists():
            raise ResourceError(f"{folder}: no RETRO work folder there", hint="Pass --workdir.")
        built = (Manifest(folder).stage("chunks") or {}).get("params", {}).get("tokenizer_fingerprint")
        if built != info["tokenizer_fingerprint"] or tokenizer_fingerprint(tokenizer) != built:
            raise ResourceError(f"{folder}: tokenized with another tokenizer than {root} was trained with "
                                f"({str(built)[:12]} vs {info['tokenizer_fingerprint'][:12]})",
                                hint="Use the work folder the model was trained on.")
        corpus = RetroCorpus(folder, chunk_size=model.config.chunk_size)
        encoder = Encoder(info["embedder"], device=device)
        retriever = ChunkRetriever(corpus, Index.open(folder / "index"), encoder, tokenizer,
                                   k or model.config.num_neighbors)
    return LoadedRetro(model, tokenizer, corpus, retriever, info)


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """The start-of-document token, then the prompt's tokens (as the pipeline tokenized documents)."""
    return [start_of_document_id(tokenizer), *tokenizer(text, add_special_tokens=False)["input_ids"]]
