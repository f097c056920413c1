"""What an index records about the embedder that made its vectors (the index owns this record; the encoder
fills it in), so that queries from another model are refused."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EncoderInfo:
    """What an index records about the model that embedded it, to refuse mismatched queries."""

    name: str
    dim: int
    normalize: bool
    max_seq_length: int | None
    fingerprint: str
    pooling: str | None = None  # how token states become one vector (mean, cls, ...); None: not recorded (older indexes)
    # a separate query encoder (a DPR question/context pair: passages by the context encoder, queries by the
    # question encoder); None: queries are embedded by this same model
    query: "EncoderInfo | None" = None

    def for_queries(self) -> "EncoderInfo":
        """The record queries are checked against."""
        return self.query or self

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dim": self.dim,
            "normalize": self.normalize,
            "max_seq_length": self.max_seq_length,
            "fingerprint": self.fingerprint,
            **({"pooling": self.pooling} if self.pooling is not None else {}),
            **({"query": self.query.to_json()} if self.query is not None else {}),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "EncoderInfo":
        query = cls.from_json(obj["query"]) if obj.get("query") else None
        return cls(obj["name"], int(obj["dim"]), bool(obj["normalize"]), obj.get("max_seq_length"), obj["fingerprint"],
                   obj.get("pooling"), query)
