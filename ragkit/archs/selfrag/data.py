"""Self-RAG training data: the released generator (instruction, input, output with reflection tokens) and
critic (instruction, input, output = one reflection token, task) formats, tokenised with the reference's
label masks: the prompt is masked, and so is every retrieved paragraph's content (between <paragraph> and
</paragraph>; the markup tokens themselves stay in the loss)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragkit.errors import InputError, Location, ResourceError
from ragkit.io.jsonl import read_jsonl, read_text
from ragkit.archs.selfrag.tokens import CRITIC_PROMPT, PARAGRAPH_CLOSE, PARAGRAPH_OPEN, generator_prompt

IGNORE = -100


@dataclass(frozen=True)
class InstructionExample:
    instruction: str
    input: str
    output: str


def read_instruction_data(path: str | Path) -> list[InstructionExample]:
    """A JSON list (the released critic files) or JSONL of {instruction, input?, output}."""
    p = Path(path)
    if not p.is_file():
        raise ResourceError(f"{p}: no such file")
    if p.suffix == ".json":
        try:
            items = json.loads(read_text(p))
        except ValueError as exc:
            raise InputError(Location(str(p)), f"not valid JSON ({exc})") from None
        if not isinstance(items, list):
            raise InputError(Location(str(p)), "expected a JSON list of {instruction, input, output} objects")
        rows = [(i, item) for i, item in enumerate(items, start=1)]
        where = "item"
    else:
        rows = list(read_jsonl(p))
        where = "line"
    examples = []
    for n, obj in rows:
        loc = Location(str(p), n)
        if not isinstance(obj, dict):
            raise InputError(loc, f"{where} {n} is not an object")
        for key in ("instruction", "output"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise InputError(Location(str(p), n, key), f"field '{key}' is missing or empty")
        text_input = obj.get("input") or ""
        if not isinstance(text_input, str):
            raise InputError(Location(str(p), n, "input"), "field 'input' must be a string")
        examples.append(InstructionExample(obj["instruction"], text_input, obj["output"]))
    if not examples:
        raise InputError(Location(str(p)), "empty input: no training examples")
    return examples


def prompt_for(example: InstructionExample, *, critic: bool) -> str:
    if critic:
        return CRITIC_PROMPT.format(instruction=example.instruction, input=example.input)
    return generator_prompt(example.instruction, example.input)


def encode(example: InstructionExample, tokenizer: Any, *, critic: bool, max_length: int) -> dict[str, list[int]]:
    """input_ids and labels for one example (prompt masked; paragraph contents masked).

    Too long: the prompt loses tokens from its start (the output, which is what is trained, is kept whole
    unless it alone exceeds max_length); the reference truncates at the right, which can drop every label."""
    prompt = prompt_for(example, critic=critic)
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + example.output + tokenizer.eos_token)["input_ids"]
    prompt_len = len(prompt_ids) if full[: len(prompt_ids)] == prompt_ids else _common_prefix(prompt_ids, full)
    if len(full) > max_length:
        cut = min(len(full) - max_length, prompt_len)
        full, prompt_len = full[cut:], prompt_len - cut
        full = full[:max_length]
    ids = full
    labels = [IGNORE] * prompt_len + ids[prompt_len:]
    vocab = tokenizer.get_vocab()
    if PARAGRAPH_OPEN in vocab and PARAGRAPH_CLOSE in vocab:
        open_id, close_id = vocab[PARAGRAPH_OPEN], vocab[PARAGRAPH_CLOSE]
        inside = False
        for i, tok in enumerate(ids):
            if tok == close_id:
                inside = False
            elif inside:
                labels[i] = IGNORE
            elif tok == open_id:
                inside = True
    return {"input_ids": ids, "labels": labels}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def collate(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
