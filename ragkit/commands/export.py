"""`ragkit export`: a training checkpoint -> a plain Hugging Face model folder (LoRA merged)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ragkit.commands._common import handle_errors


def export(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint folder (`ragkit train` OUTPUT/final or OUTPUT/checkpoint-N), or its model/ folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="New folder for the merged model (must not exist, or be empty).")],
    dtype: Annotated[str, typer.Option("--dtype", help="Saved precision: auto (as loaded), float32, bfloat16, float16.")] = "auto",
) -> None:
    """Merge LoRA weights into the base model and save a plain transformers folder (model + tokenizer),
    loadable by AutoModelForCausalLM.from_pretrained and by vLLM (the Self-RAG seed's merge step).

    A `train --arch rag` checkpoint is saved as transformers' RagSequenceForGeneration (--loss sequence) or
    RagTokenForGeneration (--loss token) with its RagTokenizer folders: its generator must be seq2seq (BART, T5),
    its query encoder a CLS-pooled BERT (DPR) and its prompt hf-rag (a transformers RAG checkpoint, or
    --rag-prompt hf-rag).

    The folder is written beside OUTPUT and renamed into place only when complete.

    Examples:

      ragkit export runs/selfrag/final -o models/selfrag-smollm2

      ragkit export runs/critic/checkpoint-500 -o models/critic --dtype bfloat16

      ragkit export runs/rag-nq/final -o models/rag-sequence-nq-tuned
    """
    with handle_errors():
        from ragkit.archs.selfrag.loading import load_causal_lm
        from ragkit.console import info
        from ragkit.models.lm import refuse_used_folder, save_model_folder

        refuse_used_folder(output)
        if (checkpoint / "rag_config.json").exists():
            from ragkit.archs.rag.hf_checkpoint import export_hf_rag
            from ragkit.errors import UsageError

            if dtype != "auto":
                raise UsageError("--dtype: a RAG checkpoint is exported in the precision it was trained in")
            kind = export_hf_rag(checkpoint, output)
            info(f"exported {checkpoint} -> {output} ({kind}; transformers opens it with {kind}.from_pretrained)")
            return
        model, tokenizer = load_causal_lm(str(checkpoint), device="cpu", dtype=dtype, merge_lora=True)
        save_model_folder(model, tokenizer, output)
        params = sum(p.numel() for p in model.parameters())
        info(f"exported {checkpoint} -> {output} ({params / 1e6:.1f}M parameters, LoRA merged)")
