"""`ragkit embed`: corpus -> embedding shards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ragkit.commands._common import BatchOpt, DeviceOpt, EncoderBackendOpt, ModelOpt, PoolingOpt, handle_errors


def embed(
    corpus: Annotated[str, typer.Argument(help="JSONL (id, text, title), BEIR corpus.jsonl or folder, or DPR TSV (a file: it is read twice).")],
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
    pooling: PoolingOpt = "model",
    ray: Annotated[bool, typer.Option("--ray", help="Embed every one of --num-shards shards on a pool of Ray actors (a private local Ray unless --ray-address: every listener bound to 127.0.0.1 and its processes ended with the command; see docs/security.md).")] = False,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="An existing Ray cluster for --ray (default: $RAY_ADDRESS, else a private local Ray).")] = None,
    ray_actors: Annotated[int, typer.Option("--ray-actors", min=1, help="Actors in the --ray pool (one model each; one per GPU when the cluster has GPUs).")] = 2,
    checkpoint_rows: Annotated[int, typer.Option("--checkpoint-rows", min=1, help="Passages embedded between checkpoints; a killed run started again with the same arguments continues from the last one.")] = 4096,
) -> None:
    """Embed a corpus into .npy shards that `ragkit index build --embeddings` reads.

    Examples:

      ragkit embed passages.jsonl -o emb/

      ragkit embed psgs_w100.tsv -o emb/ --shard-id 3 --num-shards 8 --device cuda

      ragkit embed corpus.jsonl -o emb/ --dtype float32

      ragkit embed psgs_w100.tsv -o emb/ --num-shards 16 --ray --ray-actors 8

    The corpus is streamed: a shard keeps only a block of its own rows in memory and writes vectors to the
    .npy as it goes, with a checkpoint every --checkpoint-rows passages (rerun the same command to resume).
    """
    with handle_errors():
        from ragkit.console import info, progress
        from ragkit.embeddings import embed_shard
        from ragkit.errors import UsageError
        from ragkit.models.encoder import Encoder

        if output.exists() and not output.is_dir():
            raise UsageError(f"-o {output}: exists and is not a folder (embed writes one .npy and .json per shard)")
        if ray:
            if shard_id:
                raise UsageError("--ray embeds every shard: leave out --shard-id")
            from ragkit.retrieval.loopback import reexec_with_loopback
            from ragkit.retrieval.ray_retriever import uses_private_ray

            if uses_private_ray(ray_address):
                reexec_with_loopback()  # the driver's own Ray listener on 127.0.0.1 too
            from ragkit.embeddings_ray import embed_shards_on_ray

            results = embed_shards_on_ray(
                corpus, output, model=model, num_shards=num_shards, actors=ray_actors, address=ray_address,
                device=device, normalize=normalize, max_seq_length=max_seq_length or None, backend=backend,
                pooling=pooling, dtype=dtype, batch_size=batch_size, checkpoint_rows=checkpoint_rows,
                on_shard=lambda r: info(f"shard rows {r.start}-{r.end} done ({r.rows} passages, {r.seconds:.1f}s)"),
            )
            info(f"embedded {sum(r.rows for r in results)} passages in {num_shards} shards on Ray; wrote {output}")
            return

        from ragkit.embeddings import count_passages

        # the corpus is read (and its ids checked) before the model loads; stdin is refused by embed_shard
        rows = count_passages(corpus) if str(corpus) != "-" else None
        encoder = Encoder(model, device=device, normalize=normalize, max_seq_length=max_seq_length or None,
                          backend=backend, pooling=pooling)
        with progress() as bar:
            task = bar.add_task(f"embed shard {shard_id}/{num_shards}", total=None, rate="")

            def plan(rows: int, done: int) -> None:
                bar.update(task, total=rows, completed=done)
                if done:
                    info(f"resuming shard {shard_id}/{num_shards}: {done} of {rows} passages already embedded")

            result = embed_shard(
                encoder, corpus, output, shard_id=shard_id, num_shards=num_shards, dtype=dtype,
                batch_size=batch_size, checkpoint_rows=checkpoint_rows, on_block=lambda n: bar.advance(task, n),
                on_plan=plan, corpus_rows=rows,
            )
        embedded = result.rows - result.resumed_from
        rate = embedded / result.seconds if result.seconds else 0.0
        info(
            f"embedded {embedded} passages (rows {result.start}-{result.end}) with {model} "
            f"in {result.seconds:.1f}s: {rate:.1f} passages/s on {encoder.device}; wrote {output}"
        )
