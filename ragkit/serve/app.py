"""The HTTP surface of `ragkit serve`, on FastAPI (routing, request validation, OpenAPI at /docs) and
uvicorn (the ASGI server). Every route calls the same library code `ragkit index search` and
`ragkit generate` use; the search work runs on the micro-batcher's worker thread, never on the event loop."""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from importlib import resources
from typing import Any

from ragkit.errors import InputError, RagkitError, ResourceError, UsageError
from ragkit.retrieval.retriever import RetrievalMode
from ragkit.serve.backend import InfoJob, PassagesJob, SearchJob
from ragkit.serve.batcher import Busy, MicroBatcher
from ragkit.serve.config import ServeConfig
from ragkit.serve.requests import (ChatBody, GenerateBody, RequestError, SearchBody, chat_question, check_json_body,
                                   check_k, parse_queries)

OPEN_PATHS = ("/", "/health")  # no data behind them (nor behind /static/): the page asks for the key itself


class _Guard:
    """ASGI middleware: the API key and the request-size bound, before FastAPI reads a body. Written by
    hand because Starlette has no body-size limit; it is the one place both checks must run first."""

    def __init__(self, app: Any, config: ServeConfig) -> None:
        self.app, self.key, self.limit = app, config.api_key, config.max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        if self.key is not None and not (path in OPEN_PATHS or path.startswith("/static/")):
            given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), self.key.encode()):
                return await _send_json(send, 401, _error("api_key", "missing or wrong API key (send "
                                                          "'Authorization: Bearer KEY' or 'X-API-Key: KEY')"))
        too_large = _error("body", f"the request body is larger than {self.limit} bytes (--max-body-bytes)")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send_json(send, 413, too_large)
        # read the whole body first (it is bounded), so that an oversized chunked upload is a 413 here,
        # not a parse error inside FastAPI
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await _send_json(send, 413, too_large)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False
        if body and _is_json(headers.get("content-type")):
            try:  # parsed here once more, before FastAPI parses it (bodies are bounded: a millisecond at most)
                check_json_body(body)
            except RequestError as exc:
                return await _send_json(send, exc.status, _error(exc.field, exc.message))

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _is_json(content_type: str | None) -> bool:
    """FastAPI parses a body as JSON when its type says so, or when it has no type."""
    if not content_type:
        return True
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def _error(field: str | None, message: str) -> dict[str, Any]:
    return {"error": {"field": field, "message": message}}


async def _send_json(send: Any, status: int, body: dict[str, Any]) -> None:
    import json

    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


class Server:
    """The loaded pieces: the searched backend, its batcher, and (with a model) the generation service."""

    def __init__(self, config: ServeConfig) -> None:
        from ragkit.serve.backend import LiveIndex, RayCollection

        config.check()
        self.config = config
        if config.replicas or config.shards:
            self.backend: Any = RayCollection(config.index, shards=config.shards, replicas=config.replicas,
                                              address=config.ray_address, embedder=config.embedder,
                                              device=config.device, threads=config.threads,
                                              backend=config.encoder_backend)
        else:
            self.backend = LiveIndex(config.index[0], embedder=config.embedder, device=config.device,
                                     threads=config.threads, backend=config.encoder_backend)
        self.search_batcher = MicroBatcher(self.backend.handle, window_s=config.batch_window_ms / 1000,
                                           max_batch=config.max_batch, max_pending=config.max_pending,
                                           before_batch=self.backend.refresh, idle_s=config.reload_interval_s,
                                           name="ragkit-search")
        self.generation: Any = None
        self.generate_batcher: MicroBatcher | None = None
        if config.model is not None:
            from ragkit.serve.generation import GenerationService

            self.generation = GenerationService(config)
            self.generate_batcher = MicroBatcher(self.generation.handle,
                                                 window_s=config.generate_batch_window_ms / 1000,
                                                 max_batch=config.generate_max_batch, max_pending=config.max_pending,
                                                 name="ragkit-generate")
        self.started = time.time()
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.search_batcher.close()
        if self.generate_batcher is not None:
            self.generate_batcher.close()
        if hasattr(self.backend, "close"):
            self.backend.close()

    async def run(self, batcher: MicroBatcher, job: Any, size: int) -> Any:
        try:
            return await batcher.run(job, size, self.config.timeout_s)
        except Busy as exc:
            raise RequestError("queries", f"the server is busy: {exc}; retry later", status=503) from None
        except asyncio.TimeoutError:
            raise RequestError("timeout", f"not answered within {self.config.timeout_s:g} s (--timeout)",
                               status=504) from None

    async def search(self, body: SearchBody) -> dict[str, Any]:
        queries = parse_queries(body, self.config)
        mode = self._mode(body)
        return await self._search(queries, check_k(body.k, self.config.max_k, "--max-k"), mode)

    def _mode(self, body: SearchBody) -> RetrievalMode:
        mode = RetrievalMode(body.mode, body.fusion, body.dense_weight)
        if mode.mode != "dense" and not self.backend.has_sparse:
            raise RequestError("mode", f"{mode.mode}: this index has no sparse (BM25) side"
                               + (" on Ray actors (they serve dense search)" if self.config.replicas or self.config.shards
                                  else "; add one with `ragkit index sparse DIR`"))
        return mode

    async def _search(self, queries: list[Any], k: int, mode: RetrievalMode) -> dict[str, Any]:
        return await self.run(self.search_batcher, SearchJob(queries, k, mode), len(queries))

    async def generate(self, body: GenerateBody) -> dict[str, Any]:
        from ragkit.serve.generation import GenerateJob

        if self.generation is None or self.generate_batcher is None:
            raise RequestError("model", "this server was started without --model: it searches only", status=404)
        k = check_k(body.k if body.k is not None else self.config.k, self.config.k, "the server's --k")
        queries = parse_queries(body, self.config)
        if self.generation.retrieves:
            found = await self._search(queries, k, self._mode(body))
            passages = [row["hits"] for row in found["results"]]
            version = found["version"]
        else:
            passages, version = [[] for _ in queries], None
        rows = await self.run(self.generate_batcher, GenerateJob(queries, passages), len(queries))
        return {"version": version, "results": rows}


def create_app(config: ServeConfig, *, server: Server | None = None) -> Any:
    """The ASGI app for `config`; loads the index (and model) now. `app.state.server.close()` (or leaving
    a `with TestClient(app)` block) stops its worker threads."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    server = server or Server(config)
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_: Any) -> Any:
        yield
        server.close()
        from ragkit.console import info as say

        stats = server.search_batcher.stats
        say(f"serve: stopped ({stats.jobs} index requests answered in {stats.batches} batches)")

    # docs_url=None: FastAPI's own /docs loads Swagger UI from a public CDN into this origin; _swagger_docs
    # serves the same page from the swagger-ui-bundle package instead (the server is often offline)
    app = FastAPI(title="ragkit serve", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Search a ragkit index (and generate from it) over HTTP. See docs/serve.md.")
    app.state.server = server
    static = resources.files("ragkit.serve") / "static"

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse(_error(exc.field, exc.message), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        field = ".".join(loc) or "body"
        return JSONResponse(_error(field, f"{field}: {first.get('msg')}"), status_code=422)

    @app.exception_handler(RagkitError)
    async def _ragkit_error(_: Request, exc: RagkitError) -> JSONResponse:
        status = 400 if isinstance(exc, (UsageError, InputError)) else 500 if isinstance(exc, ResourceError) else 500
        field = exc.where.field if isinstance(exc, InputError) else None
        return JSONResponse(_error(field, exc.message), status_code=status)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(_error(None, f"internal error: {type(exc).__name__}: {exc}"), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "version": server.backend.version}

    @app.get("/info")
    async def info() -> dict[str, Any]:
        described = await server.run(server.search_batcher, InfoJob(), 1)
        c = server.config
        return {**described, "sparse": server.backend.has_sparse, "generation": _generation_info(server),
                "limits": {"max_queries": c.max_queries, "max_k": c.max_k, "max_query_chars": c.max_query_chars,
                           "max_body_bytes": c.max_body_bytes, "timeout_s": c.timeout_s},
                "batching": {"window_ms": c.batch_window_ms, "max_batch": c.max_batch,
                             **server.search_batcher.stats.to_json()},
                "uptime_s": round(time.time() - server.started, 1)}

    @app.post("/search")
    async def search(body: SearchBody) -> dict[str, Any]:
        return await server.search(body)

    @app.get("/passages/{passage_id:path}")
    async def passage(passage_id: str) -> dict[str, Any]:
        found = await server.run(server.search_batcher, PassagesJob([passage_id]), 1)
        if passage_id not in found["passages"]:
            raise RequestError("id", f"no passage '{passage_id}' in version {found['version']}", status=404)
        return {"version": found["version"], **found["passages"][passage_id]}

    @app.post("/generate")
    async def generate(body: GenerateBody) -> dict[str, Any]:
        return await server.generate(body)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [] if server.generation is None else [
            {"id": server.generation.model, "object": "model", "created": int(server.started), "owned_by": "ragkit"}]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody) -> dict[str, Any]:
        if server.generation is None:
            raise RequestError("model", "this server was started without --model: it searches only", status=404)
        question = chat_question(body, server.config, server.generation.model)
        answered = await server.generate(GenerateBody(query=question))
        row = answered["results"][0]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": server.generation.model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": row["output"],
                                         # where the answer came from, as Azure OpenAI's "on your data" puts it
                                         "context": {"citations": row.get("passages", []),
                                                     "index_version": answered["version"]}}}]}

    @app.get("/", include_in_schema=False)
    async def page() -> Any:
        return FileResponse(str(static / "index.html"), media_type="text/html")

    _swagger_docs(app)
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    return _wrap(app, server.config)


def _swagger_docs(app: Any) -> None:
    """/docs from Swagger UI's files in the swagger-ui-bundle package (the `serve` extra), mounted under
    /static/swagger; without the package there is no /docs page, /openapi.json stays."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    app.mount("/static/swagger", StaticFiles(directory=str(swagger_ui_path)), name="swagger")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Any:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="ragkit serve - API",
                                   swagger_js_url="/static/swagger/swagger-ui-bundle.js",
                                   swagger_css_url="/static/swagger/swagger-ui.css",
                                   swagger_favicon_url="/static/swagger/favicon-32x32.png")


def _wrap(app: Any, config: ServeConfig) -> Any:
    """FastAPI app inside the guard; `.state` and `.app` stay reachable for tests and embedding."""
    guarded = _Guard(app, config)
    guarded.state = app.state  # type: ignore[attr-defined]
    return guarded


def _generation_info(server: Server) -> dict[str, Any] | None:
    if server.generation is None:
        return None
    c = server.config
    return {"model": c.model, "arch": c.arch, "k": c.k, "max_new_tokens": c.max_new_tokens,
            "retrieves": server.generation.retrieves,
            "batching": server.generate_batcher.stats.to_json() if server.generate_batcher else None}


def _version() -> str:
    from ragkit import __version__

    return __version__


def run(config: ServeConfig) -> None:
    """Serve until interrupted (what `ragkit serve` runs)."""
    import uvicorn

    from ragkit.console import info as say

    app = create_app(config)
    server: Server = app.state.server
    where = f"http://{'[' + config.host + ']' if ':' in config.host else config.host}:{config.port}"
    say(f"serve: {', '.join(config.index)} (version {server.backend.version}) on {where}/ "
        f"(API docs at {where}/docs)")
    if config.public and config.api_key is None:
        say(f"serve: warning: listening on {config.host} without --api-key: anyone who reaches this port can "
            "search and generate")
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning", access_log=False,
                    limit_concurrency=config.max_connections, timeout_keep_alive=5, lifespan="on")
    finally:
        server.close()
