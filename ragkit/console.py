"""Human output goes to stderr; stdout is reserved for JSONL data.

rich's Progress redirects stdout by default, which would swallow JSONL written while a bar is live,
so every progress bar in ragkit comes from `progress()` here.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr = Console(stderr=True, highlight=False, no_color="NO_COLOR" in os.environ)


def progress(*, transient: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=transient,
        redirect_stdout=False,
        redirect_stderr=False,
        disable=not sys.stderr.isatty() and os.environ.get("RAGKIT_PROGRESS") != "1",
    )


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send whatever a library prints to stdout (DeepSpeed's logger and op builds, C++ extensions through
    file descriptor 1) to stderr while the block runs, so that stdout carries only ragkit's own output."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real stdout (embedded interpreters): redirect Python's writes only
        saved = None
    if saved is not None:
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def info(message: str) -> None:
    stderr.print(message, markup=False)
