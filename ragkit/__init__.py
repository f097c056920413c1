"""ragkit: a unified retrieval-augmented language-model toolkit.

The Python API is what the `ragkit` commands call (docs/python-api.md):

    from ragkit import Encoder, Index, Passage, Retriever
    answerer = ragkit.load("rag", "smollm2-135m", index="idx", k=3)   # any --arch, its options as keywords
    ragkit.fit(ragkit.TrainConfig(arch="embedder", data="pairs.jsonl", output="runs/emb"))

Names are imported on first use, so `import ragkit` (and `ragkit --help`) loads neither torch nor faiss.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Index": "ragkit.index.index",
    "ChangeReport": "ragkit.index.index",
    "Hit": "ragkit.index.hits",
    "IndexSpec": "ragkit.index.spec",
    "SparseConfig": "ragkit.index.sparse",
    "Encoder": "ragkit.models.encoder",
    "EncoderInfo": "ragkit.index.encoder_info",
    "Passage": "ragkit.io.corpus",
    "read_passages": "ragkit.io.corpus",
    "iter_passages": "ragkit.io.corpus",
    "build_index": "ragkit.embeddings",
    "Retriever": "ragkit.retrieval.retriever",
    "RetrievalMode": "ragkit.retrieval.retriever",
    "load": "ragkit.archs.registry",
    "fit": "ragkit.archs.registry",
    "ARCHITECTURES": "ragkit.archs.registry",
    "TrainConfig": "ragkit.train.config",
    "Question": "ragkit.io.queries",
    "ClosedBookOptions": "ragkit.archs.reader.inference",
    "RetrieveReadOptions": "ragkit.archs.reader.inference",
    "RagCheckpointOptions": "ragkit.archs.rag.inference",
    "SelfRagOptions": "ragkit.archs.selfrag.inference",
    "RetroOptions": "ragkit.archs.retro.inference",
    "RetroModel": "ragkit.archs.retro.model",
    "RetroConfig": "ragkit.archs.retro.model",
    "RagkitError": "ragkit.errors",
    "InputError": "ragkit.errors",
    "ResourceError": "ragkit.errors",
    "UsageError": "ragkit.errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from ragkit.archs.rag.inference import RagCheckpointOptions
    from ragkit.archs.reader.inference import ClosedBookOptions, RetrieveReadOptions
    from ragkit.archs.registry import ARCHITECTURES, fit, load
    from ragkit.archs.retro.inference import RetroOptions
    from ragkit.archs.retro.model import RetroConfig, RetroModel
    from ragkit.archs.selfrag.inference import SelfRagOptions
    from ragkit.io.queries import Question
    from ragkit.train.config import TrainConfig
    from ragkit.embeddings import build_index
    from ragkit.errors import InputError, RagkitError, ResourceError, UsageError
    from ragkit.index.hits import Hit
    from ragkit.index.index import ChangeReport, Index
    from ragkit.index.sparse import SparseConfig
    from ragkit.index.spec import IndexSpec
    from ragkit.io.corpus import Passage, iter_passages, read_passages
    from ragkit.index.encoder_info import EncoderInfo
    from ragkit.models.encoder import Encoder
    from ragkit.retrieval.retriever import RetrievalMode, Retriever


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ragkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
