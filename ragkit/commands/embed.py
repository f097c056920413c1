"""`ragkit embed`: corpus -> embedding shards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ragkit.commands._common import BatchOpt, DeviceOpt, EncoderBackendOpt, ModelOpt, handle_errors


def embed(
    corpus: Annotated[str, typer.Argument(help="JSONL (id, text, title), BEIR corpus.jsonl or folder, DPR TSV, or - for stdin.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the shard files (created if missing).")],
    model: ModelOpt = "minilm",
    shard_id: Annotated[int, typer.Option("--shard-id", min=0, help="Which shard this run embeds.")] = 0,
    num_shards: Annotated[int, typer.Option("--num-shards", min=1, help="How many shards split the corpus.")] = 1,
    dtype: Annotated[str, typer.Option("--dtype", help="Stored precision: float16 or float32.")] = "float16",
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize", help="L2-normalise embeddings (cosine).")] = True,
    batch_size: BatchOpt = 64,
    max_seq_length: Annotated[int, typer.Option("--max-seq-length", min=0, help="Truncate texts to this many tokens (0 = the model's own).")] = 0,
    device: DeviceOpt = "auto",
    backend: EncoderBackendOpt = "torch",
) -> None:
    """Embed a corpus into .npy shards that `ragkit index build --embeddings` reads.

    Examples:

      ragkit embed passages.jsonl -o emb/

      ragkit embed psgs_w100.tsv -o emb/ --shard-id 3 --num-shards 8 --device cuda

      cat corpus.jsonl | ragkit embed - -o emb/ --dtype float32
    """
    with handle_errors():
        from ragkit.console import info, progress
        from ragkit.embeddings import embed_shard, shard_bounds
        from ragkit.io.corpus import read_passages
        from ragkit.models.encoder import Encoder

        passages = read_passages(corpus)
        start, end = shard_bounds(len(passages), shard_id, num_shards)
        encoder = Encoder(model, device=device, normalize=normalize, max_seq_length=max_seq_length or None,
                          backend=backend)
        with progress() as bar:
            task = bar.add_task(f"embed shard {shard_id}/{num_shards}", total=end - start, rate="")
            result = embed_shard(
                encoder, passages, output, shard_id=shard_id, num_shards=num_shards, dtype=dtype,
                batch_size=batch_size, on_block=lambda n: bar.advance(task, n),
            )
        rate = result.rows / result.seconds if result.seconds else 0.0
        info(
            f"embedded {result.rows} passages (rows {result.start}-{result.end}) with {model} "
            f"in {result.seconds:.1f}s: {rate:.1f} passages/s on {encoder.device}; wrote {output}"
        )
