"""`ragkit serve`: the index (and a reader) behind HTTP; a thin skin over ragkit.serve."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from ragkit.commands._common import DeviceOpt, EncoderBackendOpt, ThreadsOpt, handle_errors
from ragkit.serve.config import ServeConfig

_D = ServeConfig()


def serve(
    index: Annotated[list[str], typer.Argument(help="The index folder to serve (several with --shards).", show_default=False)],
    host: Annotated[str, typer.Option("--host", help="Address to listen on; 127.0.0.1 keeps it on this machine, 0.0.0.0 opens it to the network (then give --api-key).")] = _D.host,
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = _D.port,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="RAGKIT_API_KEY", show_envvar=True, help="Require this key ('Authorization: Bearer KEY' or 'X-API-Key: KEY') on every route but /, /static and /health. Prefer the environment variable: a flag shows in `ps`.", show_default=False)] = None,
    embedder: Annotated[str | None, typer.Option("--embedder", help="Query embedder; must be the model that built the index, or its recorded query encoder (default: that model).", show_default=False)] = None,
    encoder_backend: EncoderBackendOpt = _D.encoder_backend,
    device: DeviceOpt = _D.device,
    threads: ThreadsOpt = _D.threads,
    batch_window_ms: Annotated[float, typer.Option("--batch-window-ms", help="Micro-batching: how long a batch waits for more requests after taking those already waiting (0: none; under load requests queue while a batch runs and are batched anyway).")] = _D.batch_window_ms,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Micro-batching: queries per batch at most (1 = one request at a time).")] = _D.max_batch,
    max_pending: Annotated[int, typer.Option("--max-pending", help="Queries waiting at most; beyond it requests get 503 with Retry-After.")] = _D.max_pending,
    max_queries: Annotated[int, typer.Option("--max-queries", help="Queries per request at most (413 beyond).")] = _D.max_queries,
    max_k: Annotated[int, typer.Option("--max-k", help="Largest k a request may ask for (422 beyond).")] = _D.max_k,
    max_query_chars: Annotated[int, typer.Option("--max-query-chars", help="Characters per query at most (413 beyond).")] = _D.max_query_chars,
    max_body_bytes: Annotated[int, typer.Option("--max-body-bytes", help="Request body size at most (413 beyond).")] = _D.max_body_bytes,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds a request may wait for its answer (504 beyond).")] = _D.timeout_s,
    max_connections: Annotated[int, typer.Option("--max-connections", help="Concurrent connections at most (uvicorn answers 503 beyond).")] = _D.max_connections,
    reload_interval: Annotated[float, typer.Option("--reload-interval", help="Seconds between looks for a newer index version while idle (a busy server looks before every batch).")] = _D.reload_interval_s,
    replicas: Annotated[int, typer.Option("--replicas", help="Serve through this many Ray actors each holding the index (0 = in this process).")] = _D.replicas,
    shards: Annotated[bool, typer.Option("--shards", help="The index folders are shards of one collection, one Ray actor each; hits are merged.")] = _D.shards,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Ray cluster for --replicas/--shards (default: $RAY_ADDRESS, else a private local Ray on 127.0.0.1).", show_default=False)] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Generator (hub id, local folder, or alias smollm2-135m) for POST /generate and /v1/chat/completions; without it the server only searches.", show_default=False)] = None,
    arch: Annotated[str, typer.Option("--arch", help="How --model answers: rag (retrieve-then-read), selfrag (a Self-RAG model) or none (closed book).")] = _D.arch,
    k: Annotated[int, typer.Option("--k", help="Passages retrieved per generated answer (a request may ask for fewer).")] = _D.k,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens generated per answer at most.")] = _D.max_new_tokens,
    generator_backend: Annotated[str, typer.Option("--generator-backend", help="transformers, or vllm (in the vLLM environment: make vllm-env).")] = _D.generator_backend,
    dtype: Annotated[str, typer.Option("--dtype", help="Generator weights: auto, float32, bfloat16 or float16.")] = _D.dtype,
    generate_batch_window_ms: Annotated[float, typer.Option("--generate-batch-window-ms", help="Micro-batching of generation: how long a batch waits for more questions.")] = _D.generate_batch_window_ms,
    generate_max_batch: Annotated[int, typer.Option("--generate-max-batch", help="Questions generated together at most.")] = _D.generate_max_batch,
) -> None:
    """Serve an index over HTTP: POST /search, GET /passages/{id}, GET /info, GET /health, a search page at /;
    with --model also POST /generate and an OpenAI-compatible POST /v1/chat/completions.

    Requests arriving together are encoded and searched as one batch; `ragkit index add/remove/refresh`
    on the served folder is picked up without a restart (each request sees one version). See docs/serve.md.

    Examples:

      ragkit serve idx/                                   # http://127.0.0.1:8000/

      ragkit serve idx/ --model smollm2-135m --k 3            # also /generate and /v1/chat/completions

      RAGKIT_API_KEY=... ragkit serve idx/ --host 0.0.0.0 --port 8080
    """
    with handle_errors():
        from ragkit.errors import ResourceError
        from ragkit.serve.app import run

        try:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError:
            raise ResourceError("ragkit serve needs FastAPI and uvicorn", hint="pip install 'ragkit[serve]'") from None
        config = ServeConfig(
            index=list(index), host=host, port=port, api_key=api_key or None, embedder=embedder, device=device,
            threads=threads, encoder_backend=encoder_backend, batch_window_ms=batch_window_ms, max_batch=max_batch,
            max_pending=max_pending, max_queries=max_queries, max_k=max_k, max_query_chars=max_query_chars,
            max_body_bytes=max_body_bytes, timeout_s=timeout, max_connections=max_connections,
            reload_interval_s=reload_interval, replicas=replicas, shards=shards,
            ray_address=ray_address or os.environ.get("RAY_ADDRESS"), model=model, arch=arch, k=k,
            max_new_tokens=max_new_tokens, generator_backend=generator_backend, dtype=dtype,
            generate_batch_window_ms=generate_batch_window_ms, generate_max_batch=generate_max_batch)
        config.check()
        run(config)
