"""Options owned by a schema: each architecture's inference options are a dataclass, and a flag the chosen
architecture does not read is refused (exit 2, naming the flag) before any model loads.

Commands pass the flags the user actually gave (click's parameter source, not a comparison with defaults, so
`--k 5` is refused where k is unused even though 5 is the default)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from ragkit.errors import UsageError


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def refuse_unused(given: Mapping[str, str], allowed: Iterable[str], what: str, hint: str | None = None) -> None:
    """`given`: option name -> the flag as typed. Any given option outside `allowed` is a usage error."""
    allowed = set(allowed)
    unused = [flag for name, flag in given.items() if name not in allowed]
    if unused:
        raise UsageError(f"{', '.join(unused)}: not used by {what}", hint=hint)


def build_options(cls: type, values: Mapping[str, Any]) -> Any:
    """An options dataclass from a command's values (only the fields it has) or a Python caller's keywords.
    Unknown keywords are refused, naming them and the known ones."""
    known = field_names(cls)
    return _checked(cls(**{k: v for k, v in values.items() if k in known}))


def options_from_keywords(cls: type, keywords: Mapping[str, Any], what: str) -> Any:
    """`ragkit.load(arch, model, **keywords)`: every keyword must be a field of the architecture's options."""
    known = field_names(cls)
    unknown = sorted(set(keywords) - known)
    if unknown:
        raise UsageError(f"{', '.join(unknown)}: not an option of {what}", hint=f"Its options: {', '.join(sorted(known))}.")
    return _checked(cls(**keywords))


def _checked(options: Any) -> Any:
    """Values are checked when the options are made, so that a bad one fails before any model loads."""
    check = getattr(options, "check", None)
    if check is not None:
        check()
    return options


@dataclasses.dataclass
class RetrievalOptions:
    """Where passages come from (an index, or the rows' own ctxs / hits) and how the index is searched."""

    index: str | None = None
    k: int = 5
    passages: str = "auto"
    retrieval_mode: str = "dense"
    fusion: str = "rrf"
    dense_weight: float = 0.5

    def search_mode(self) -> Any:
        from ragkit.retrieval.retriever import RetrievalMode

        return RetrievalMode.checked(self.retrieval_mode, self.fusion, self.dense_weight)

    def retriever(self, device: str) -> Any:
        """The in-process retriever over --index (None without one)."""
        if self.index is None:
            return None
        from ragkit.retrieval.retriever import Retriever

        return Retriever(self.index, device=device, mode=self.search_mode())

    def check(self) -> None:
        from ragkit.archs.reader.answer import SOURCES

        self.search_mode()
        if self.passages not in SOURCES:
            raise UsageError(f"--passages {self.passages}: expected one of {', '.join(SOURCES)}")
        if self.passages in ("ctxs", "hits") and self.index is not None:
            raise UsageError(f"--passages {self.passages} reads the input's own passages; --index is not used with it")
        if self.passages == "index" and self.index is None:
            raise UsageError("--passages index needs --index DIR")
        if self.index is None and (self.retrieval_mode, self.fusion, self.dense_weight) != ("dense", "rrf", 0.5):
            raise UsageError("--retrieval-mode, --fusion and --dense-weight choose how --index is searched; "
                             "give --index DIR (passages read from the input are used as they are)")
        if self.k < 1:
            raise UsageError("--k must be at least 1")
