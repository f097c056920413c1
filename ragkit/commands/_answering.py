"""What `generate` and `eval` share: which flags the user gave, the architecture's options schema, and the
answering loop with its progress bar. Generic over ragkit.archs.registry; no architecture is named here."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import typer


def given_flags(ctx: typer.Context) -> dict[str, str]:
    """Option name -> the flag as the user typed it, for every option given on the command line (or through
    its environment variable), whatever its value; defaults are not "given"."""
    given = {}
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if source is None or source.name not in ("COMMANDLINE", "ENVIRONMENT") or not param.opts:
            continue
        flag = param.opts[0]
        if getattr(param, "secondary_opts", None) and ctx.params.get(param.name) is False:
            flag = param.secondary_opts[0]  # --greedy, --no-groundness, --short-form
        given[param.name] = flag
    return given


def plain_values(params: dict[str, Any]) -> dict[str, Any]:
    """Command values as the options dataclasses hold them (paths as strings, repeated flags as tuples)."""
    out = {}
    for name, value in params.items():
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, list):
            value = tuple(value)
        out[name] = value
    return out


def prepare(arch: str, model: str, ctx: typer.Context, command_level: set[str]) -> tuple[Any, Any]:
    """(architecture, options) for `--arch ARCH --model MODEL`: every given flag is a field of the chosen
    options schema or one of the command's own (`command_level`); any other is refused before loading."""
    from ragkit.archs import registry
    from ragkit.archs.options import build_options, field_names, refuse_unused

    architecture = registry.get(arch)
    cls = architecture.options_class(model)
    given = given_flags(ctx)
    refuse_unused(given, field_names(cls) | command_level, getattr(cls, "what", f"--arch {arch}"))
    # only what was given: a field's default lives in its dataclass (a RAG checkpoint's k is its own n_docs,
    # not the flag's 5), and the flags' shown defaults are tested to equal the dataclasses'
    return architecture, build_options(cls, plain_values({name: ctx.params[name] for name in given}))


def answer_in_blocks(questions: Sequence[Any], answerer: Any, label: str, block: int = 32) -> Iterator[dict[str, Any]]:
    """Answer in blocks with a progress bar; yields output rows in input order."""
    from ragkit.console import info, progress
    from ragkit.models.encoder import Throughput

    meter = Throughput()
    with progress() as bar:
        task = bar.add_task(label, total=len(questions), rate="")
        for start in range(0, len(questions), block):
            rows = answerer.answer(questions[start : start + block])
            meter.add(len(rows))
            bar.update(task, advance=len(rows), rate=f"{meter.rate:.2f} q/s")
            yield from rows
    info(f"answered {meter.count} questions in {meter.seconds:.1f}s ({meter.rate:.2f} questions/s, {answerer.device})")
    summary = answerer.summary() if hasattr(answerer, "summary") else None
    if summary:
        info(summary)
