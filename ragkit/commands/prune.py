"""`ragkit prune`: drop decoder layers and/or zero small weights of a generator; a thin skin over ragkit.models.prune."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ragkit.commands._common import JsonOpt, handle_errors


def prune(
    model: Annotated[str, typer.Argument(help="The generator: hub id, local folder, .gguf or alias (smollm2-135m), or a `ragkit export`ed model.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="New folder for the pruned model (must not exist, or be empty).", show_default=False)],
    keep_every: Annotated[int, typer.Option("--keep-every", min=0, help="Structured: keep every N-th layer from the first (2 halves the depth; 0 = keep all).")] = 0,
    keep_layers: Annotated[str | None, typer.Option("--keep-layers", help="Structured: the 0-indexed layers to keep, comma-separated (instead of --keep-every).", show_default=False)] = None,
    sparsity: Annotated[float, typer.Option("--sparsity", help="Magnitude pruning: the share of each layer Linear weight set to zero (0 = none).")] = 0.0,
    method: Annotated[str, typer.Option("--method", help="Magnitude pruning: l1-unstructured (single weights) or ln-structured (whole output rows by L2 norm).")] = "l1-unstructured",
    dtype: Annotated[str, typer.Option("--dtype", help="Saved precision: auto (as loaded), float32, bfloat16, float16.")] = "auto",
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run the model repository's own code (off unless asked).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Prune a generator and save a plain Hugging Face folder: drop layers (structured; the model gets smaller
    and faster) and/or zero the smallest weights with torch.nn.utils.prune (same shapes; sparse only).

    Examples:

      ragkit prune smollm2-135m --keep-every 2 -o models/smollm2-15l         # 15 of 30 layers (a student to distil)

      ragkit prune runs/rag/final/generator --sparsity 0.3 -o models/rag-30pct
    """
    with handle_errors():
        from ragkit.console import info
        from ragkit.errors import UsageError
        from ragkit.models.lm import load_lm, refuse_used_folder, save_model_folder
        from ragkit.models.prune import prune_model

        refuse_used_folder(output)
        keep = None
        if keep_layers is not None:
            try:
                keep = [int(x) for x in keep_layers.split(",") if x.strip()]
            except ValueError:
                raise UsageError(f"--keep-layers {keep_layers}: expected comma-separated layer numbers") from None
        loaded = load_lm(model, device="cpu", dtype=dtype, trust_remote_code=trust_remote_code)
        report = prune_model(loaded.model, keep=keep, every=keep_every, sparsity=sparsity, method=method)
        save_model_folder(loaded.model, loaded.tokenizer, output)
        info(f"pruned {model} -> {output}: {report.layers_before} -> {report.layers_after} layers, "
             f"{report.params_before / 1e6:.2f}M -> {report.params_after / 1e6:.2f}M parameters "
             f"({report.nonzero_after / 1e6:.2f}M non-zero)")
        if as_json:
            sys.stdout.write(json.dumps({"output": str(output), **report.to_json()}) + "\n")
