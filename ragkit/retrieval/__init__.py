"""Retrievers: every architecture retrieves through `Retriever`, which searches through `Index`."""

from ragkit.retrieval.retriever import Retriever

__all__ = ["Retriever"]
