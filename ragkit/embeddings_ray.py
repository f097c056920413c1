"""`ragkit embed --ray`: every shard of a corpus embedded by a pool of Ray actors.

Each actor loads the embedder once and embeds whole shards with `embed_shard`, the single-process path,
so the files are the same bytes the shards would have run one by one (and a shard killed half-way
resumes from its checkpoint when the command is run again). Shards, not rows, are the unit of work:
Ray Data's `map_batches` would stream rows through the actors too, but it gives no control of which rows
land in which output file, and the shard layout is what `index build --embeddings` and Self-RAG's tools
read. One actor per GPU when there are GPUs (`num_gpus=1`), else one per `--ray-actors` CPU slot.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ragkit.embeddings import ShardResult


def embed_shards_on_ray(  # noqa: PLR0913  (the embed options, passed through)
    corpus: str | Path,
    out_dir: str | Path,
    *,
    model: str,
    num_shards: int,
    actors: int,
    address: str | None = None,
    device: str = "auto",
    normalize: bool = True,
    max_seq_length: int | None = None,
    backend: str = "torch",
    pooling: str = "model",
    dtype: str = "float16",
    batch_size: int = 64,
    checkpoint_rows: int = 4096,
    on_shard: Callable[[ShardResult], None] | None = None,
) -> list[ShardResult]:
    from ragkit.embeddings import count_passages
    from ragkit.retrieval.ray_retriever import start_ray

    rows = count_passages(corpus)  # once, not once per shard
    ray = start_ray(address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    per_actor = {"num_gpus": 1, "num_cpus": 1} if gpus and device != "cpu" else {"num_cpus": 1}
    count = min(actors, num_shards, gpus) if "num_gpus" in per_actor else min(actors, num_shards)

    @ray.remote(**per_actor)
    class EmbedWorker:
        def __init__(self) -> None:
            from ragkit.models.encoder import Encoder

            self.encoder = Encoder(model, device="cuda" if "num_gpus" in per_actor else "cpu", normalize=normalize,
                                   max_seq_length=max_seq_length, backend=backend, pooling=pooling)

        def embed(self, shard_id: int) -> ShardResult:
            from ragkit.embeddings import embed_shard

            return embed_shard(self.encoder, corpus, out_dir, shard_id=shard_id, num_shards=num_shards, dtype=dtype,
                               batch_size=batch_size, checkpoint_rows=checkpoint_rows, corpus_rows=rows)

    from ray.util import ActorPool

    pool = ActorPool([EmbedWorker.remote() for _ in range(max(1, count))])
    results: list[ShardResult] = []
    for result in pool.map_unordered(lambda actor, shard: actor.embed.remote(shard), range(num_shards)):
        results.append(result)
        if on_shard is not None:
            on_shard(result)
    return sorted(results, key=lambda r: r.start)
