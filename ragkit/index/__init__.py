"""The one index abstraction: `Index` (Faiss vectors + SQLite passages + manifest, one directory)."""

from ragkit.index.index import ChangeReport, Hit, Index
from ragkit.index.spec import IndexSpec, choose_auto, parse_memory, parse_spec

__all__ = ["ChangeReport", "Hit", "Index", "IndexSpec", "choose_auto", "parse_memory", "parse_spec"]
