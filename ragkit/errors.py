"""Errors that the CLI turns into one-line messages and meaningful exit codes.

The library raises these; only `ragkit.commands` decides how they are printed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1  # a bug
    USAGE = 2  # bad option or argument
    INVALID_INPUT = 3  # malformed data in a file or on stdin
    MISSING_RESOURCE = 4  # missing/incompatible model, index, dimension
    INTERRUPTED = 130


class RagkitError(Exception):
    """Base class: `message` is one line; `hint` says what to do next."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(RagkitError):
    exit_code = ExitCode.USAGE


class ResourceError(RagkitError):
    """A model, index or file that is missing, or does not fit what it is used with."""

    exit_code = ExitCode.MISSING_RESOURCE


class DiskFullError(ResourceError):
    """A write found its device full; the writer has cleaned up or left a resumable state, and says which."""


@dataclass
class Location:
    path: str
    line: int | None = None
    field: str | None = None

    def __str__(self) -> str:
        out = self.path
        if self.line is not None:
            out += f":{self.line}"
        return out


class InputError(RagkitError):
    """Bad input data: always names the file, and the line and field when known."""

    exit_code = ExitCode.INVALID_INPUT

    def __init__(self, where: Location, message: str, *, hint: str | None = None) -> None:
        self.where = where
        prefix = f"{where}: "
        if where.field is not None and f"'{where.field}'" not in message:
            message = f"field '{where.field}': {message}"
        super().__init__(prefix + message, hint=hint)
