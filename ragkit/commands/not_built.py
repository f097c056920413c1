"""Subcommands whose issues are still open: one honest line and a non-zero exit, no fake output."""

from __future__ import annotations

from typing import Annotated

import typer

from ragkit.commands._common import handle_errors
from ragkit.errors import NotBuiltError

ARCHS = ("rag", "selfrag-critic", "selfrag", "retro", "embedder")

PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def _not_built(what: str, issue: str) -> None:
    with handle_errors():
        raise NotBuiltError(f"`ragkit {what}` is not built yet (tracked in issue {issue}).")


def train(
    ctx: typer.Context,
    arch: Annotated[str, typer.Option("--arch", help=f"Architecture: {', '.join(ARCHS)}.")] = "rag",
) -> None:
    """Train a RAG, Self-RAG critic/generator, RETRO or embedder model (not built yet)."""
    issue = {"rag": "#4", "selfrag-critic": "#6", "selfrag": "#6", "retro": "#5", "embedder": "#7"}.get(arch, "#4")
    _not_built(f"train --arch {arch}", issue)


def train_rag(ctx: typer.Context) -> None:
    """Alias of `ragkit train --arch rag` (not built yet)."""
    _not_built("train-rag", "#4")


def train_selfrag(ctx: typer.Context) -> None:
    """Alias of `ragkit train --arch selfrag` (not built yet)."""
    _not_built("train-selfrag", "#6")


def train_retro(ctx: typer.Context) -> None:
    """Alias of `ragkit train --arch retro` (not built yet)."""
    _not_built("train-retro", "#5")


def register(app: typer.Typer) -> None:
    app.command("train", context_settings=PASSTHROUGH)(train)
    app.command("train-rag", context_settings=PASSTHROUGH)(train_rag)
    app.command("train-selfrag", context_settings=PASSTHROUGH)(train_selfrag)
    app.command("train-retro", context_settings=PASSTHROUGH)(train_retro)
