"""Human output goes to stderr; stdout is reserved for JSONL data.

rich's Progress redirects stdout by default, which would swallow JSONL written while a bar is live,
so every progress bar in ragkit comes from `progress()` here.
"""

from __future__ import annotations

import os
import sys

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


def info(message: str) -> None:
    stderr.print(message, markup=False)
