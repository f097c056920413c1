"""`ragkit retro import`: RETRO-pytorch's memmaps -> a ragkit RETRO work folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ragkit.commands._common import DeviceOpt, JsonOpt, handle_errors

app = typer.Typer(help="RETRO data tools.", no_args_is_help=True)


@app.command("import")
def import_(
    chunks: Annotated[Path, typer.Option("--chunks", help="RETRO-pytorch's chunks memmap (train.chunks.dat: int32, chunk_size + 1 per row).", show_default=False)],
    num_chunks: Annotated[int, typer.Option("--num-chunks", min=1, help="Chunks RETRO-pytorch wrote (its stats['chunks']; the file is max_chunks long).", show_default=False)],
    num_seqs: Annotated[int, typer.Option("--num-seqs", min=1, help="Sequences RETRO-pytorch wrote (its stats['seqs']).", show_default=False)],
    workdir: Annotated[Path, typer.Option("--workdir", help="The ragkit work folder to create (then: ragkit train --arch retro --workdir W --data W).", show_default=False)],
    tokenizer: Annotated[str, typer.Option("--tokenizer", help="The tokenizer RETRO-pytorch used (its default: bert-base-cased; a hub id or folder).", show_default=False)],
    seq_len: Annotated[int, typer.Option("--seq-len", min=1, help="RETRO-pytorch's max_seq_len (tokens per training sequence).")] = 2048,
    chunk_size: Annotated[int, typer.Option("--chunk-size", min=1, help="RETRO-pytorch's chunk_size.")] = 64,
    seqs: Annotated[Path | None, typer.Option("--seqs", help="The sequences memmap (default: X.seq.dat beside X.chunks.dat).", show_default=False)] = None,
    doc_ids: Annotated[Path | None, typer.Option("--doc-ids", help="The document ids memmap (default: X.doc_ids.dat beside it).", show_default=False)] = None,
    knn: Annotated[Path | None, typer.Option("--knn", help="The neighbours memmap (default: X.chunks.knn.dat beside it, when there; without one ragkit computes neighbours).", show_default=False)] = None,
    pad_id: Annotated[int, typer.Option("--pad-id", help="The pad token id in the chunks (RETRO-pytorch pads with 0).")] = 0,
    embedder: Annotated[str, typer.Option("--embedder", help="ragkit embedder for the chunk index that generation and held-out evaluation search.")] = "minilm",
    index_spec: Annotated[str, typer.Option("--index-spec", help="Spec of that chunk index.")] = "flat",
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Import a corpus RETRO-pytorch prepared (train.chunks.dat, train.seq.dat, train.doc_ids.dat and
    train.chunks.knn.dat) into a ragkit RETRO work folder: its chunks, sequences and neighbours kept as they
    are (padding converted to ragkit's -1), a ragkit chunk index built for generation. See docs/retro.md.

    Example:

      ragkit retro import --chunks train.chunks.dat --num-chunks 81920 --num-seqs 2560 --tokenizer bert-base-cased --workdir work/
    """
    with handle_errors():
        from ragkit.archs.retro.import_memmaps import MemmapPaths, import_memmaps
        from ragkit.console import info
        from ragkit.models.encoder import resolve_device

        paths = MemmapPaths.beside(chunks, seqs=seqs, doc_ids=doc_ids, knn=knn)
        summary = import_memmaps(paths, workdir, num_chunks=num_chunks, num_seqs=num_seqs, chunk_size=chunk_size,
                                 seq_len=seq_len, tokenizer_name=tokenizer, embedder=embedder, index_spec=index_spec,
                                 pad_id=pad_id, device=resolve_device(device))
        info(f"imported {summary['chunks']} chunks of {summary['documents']} documents, {summary['sequences']} "
             f"sequences, {summary['neighbours'] or 'no'} neighbours per chunk into {workdir}")
        if as_json:
            sys.stdout.write(json.dumps(summary) + "\n")
