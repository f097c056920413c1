"""`ragkit selfrag label`: plain instruction data -> Self-RAG generator training data, labelled by a critic."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ragkit.commands._common import BatchOpt, DeviceOpt, handle_errors

app = typer.Typer(help="Self-RAG data creation.", no_args_is_help=True)


@app.command("label")
def label(
    input_file: Annotated[str, typer.Argument(help="JSONL with instruction (or question), optional input, output (or answers); - for stdin.")],
    critic: Annotated[str, typer.Option("--critic", help="A trained critic: `ragkit train --arch selfrag-critic` checkpoint, exported folder or hub id.")],
    index: Annotated[Path, typer.Option("--index", help="ragkit index the passages come from.")],
    ndocs: Annotated[int, typer.Option("--ndocs", "-k", min=1, help="Passages judged per example that needs retrieval.")] = 5,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    limit: Annotated[int, typer.Option("--limit", min=0, help="Only the first N examples (0 = all).")] = 0,
) -> None:
    """Insert reflection tokens into plain (instruction, output) data with a critic and the retriever.

    Per example the critic decides [Retrieval] / [No Retrieval] and rates utility; with retrieval it judges
    each passage's relevance and the output's support, and the best passage is written in front of the
    output. JSONL out: the input fields, `output` with reflection tokens, and the critic's `critic` labels.

    Examples:

      ragkit selfrag label train.jsonl --critic runs/critic/final --index idx/ > selfrag_train.jsonl

      ragkit selfrag label train.jsonl --critic runs/critic/final --index idx/ | ragkit train --arch selfrag --data /dev/stdin -o runs/gen
    """
    with handle_errors():
        from ragkit.errors import InputError, Location
        from ragkit.io.jsonl import display_name, read_jsonl
        from ragkit.archs.selfrag.critic import Critic, label_examples
        from ragkit.archs.selfrag.loading import load_causal_lm
        from ragkit.retrieval import Retriever

        name = display_name(input_file)
        examples = []
        for lineno, obj in read_jsonl(input_file):
            instruction = obj.get("instruction", obj.get("question"))
            output = obj.get("output", obj.get("answer"))
            if output is None and isinstance(obj.get("answers"), list) and obj["answers"]:
                output = obj["answers"][0]
            if not isinstance(instruction, str) or not instruction.strip():
                raise InputError(Location(name, lineno, "instruction"), "field 'instruction' is missing")
            if not isinstance(output, str) or not output.strip():
                raise InputError(Location(name, lineno, "output"), "field 'output' is missing")
            examples.append({**obj, "instruction": instruction, "output": output})
            if limit and len(examples) >= limit:
                break
        if not examples:
            raise InputError(Location(name), "empty input: no examples")
        retriever = Retriever(index, device=device)
        model, tokenizer = load_causal_lm(critic, device=device, merge_lora=True)
        judge = Critic(model, tokenizer, batch_size=batch_size, name=critic)

        def passages(queries: list[str], k: int) -> list[list[dict]]:
            return [[h.to_json() for h in row] for row in retriever.retrieve(queries, k)]

        for start in range(0, len(examples), 64):
            for row in label_examples(judge, examples[start : start + 64], passages, ndocs):
                sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
            sys.stdout.flush()
