"""ragkit: a unified retrieval-augmented language-model toolkit.

The Python API is what the `ragkit` commands call (docs/python-api.md):

    from ragkit import Encoder, Index, Passage, Retriever

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
    "EncoderInfo": "ragkit.models.encoder",
    "Passage": "ragkit.io.corpus",
    "read_passages": "ragkit.io.corpus",
    "iter_passages": "ragkit.io.corpus",
    "build_index": "ragkit.embeddings",
    "Retriever": "ragkit.retrieval.retriever",
    "RetrievalMode": "ragkit.retrieval.retriever",
    "RagkitError": "ragkit.errors",
    "InputError": "ragkit.errors",
    "ResourceError": "ragkit.errors",
    "UsageError": "ragkit.errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from ragkit.embeddings import build_index
    from ragkit.errors import InputError, RagkitError, ResourceError, UsageError
    from ragkit.index.hits import Hit
    from ragkit.index.index import ChangeReport, Index
    from ragkit.index.sparse import SparseConfig
    from ragkit.index.spec import IndexSpec
    from ragkit.io.corpus import Passage, iter_passages, read_passages
    from ragkit.models.encoder import Encoder, EncoderInfo
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
