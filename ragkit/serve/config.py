"""What `ragkit serve` runs with: one dataclass the command fills and `create_app` reads."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ragkit.errors import UsageError

GENERATING_ARCHS = ("none", "rag", "selfrag")  # the answerers that read passages the server retrieved (or none)


@dataclass
class ServeConfig:
    index: list[str] = field(default_factory=list)  # one index; several with shards=True
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # required on every route but /health when set
    embedder: str | None = None  # the query embedder (default: the model that built the index)
    device: str = "auto"
    threads: int = 0  # Faiss threads (0 = Faiss' default)
    encoder_backend: str = "torch"
    # micro-batching: a batch takes every request waiting, then waits batch_window_ms for more, up to
    # max_batch queries; under load the requests that queue while a batch runs form the next one, so 0 ms
    # batches as well as 5 ms did, without making a lone request wait (docs/benchmarks.md, serve_load)
    batch_window_ms: float = 0.0
    max_batch: int = 64
    max_pending: int = 4096  # queries waiting; beyond it requests get 503 (back-pressure, not a growing queue)
    # request bounds
    max_queries: int = 64
    max_k: int = 100
    max_query_chars: int = 4096
    max_body_bytes: int = 1 << 20
    timeout_s: float = 30.0
    max_connections: int = 256
    reload_interval_s: float = 1.0  # how often an idle server looks for a newer index version
    # scale-out through ragkit.retrieval's Ray actors
    replicas: int = 0  # >0: this many Ray actors each hold the index, used round-robin
    shards: bool = False  # the given indexes are shards of one collection: every one is asked, hits merged
    ray_address: str | None = None
    # generation (POST /generate, /v1/chat/completions): only with a model
    model: str | None = None
    arch: str = "rag"
    k: int = 5  # passages retrieved per generated answer
    max_new_tokens: int = 32
    generator_backend: str = "transformers"
    dtype: str = "auto"
    generate_batch_window_ms: float = 20.0
    generate_max_batch: int = 8

    def check(self) -> None:
        """Refuse a configuration before anything loads, naming the flag."""
        if not self.index:
            raise UsageError("give the index folder to serve")
        if len(self.index) > 1 and not self.shards:
            raise UsageError("several index folders are served as shards of one collection: add --shards")
        if self.shards and self.replicas:
            raise UsageError("--shards and --replicas are two layouts; choose one")
        if self.shards and len(self.index) < 2:  # one Ray shard would wait for the others forever
            raise UsageError(f"--shards: {len(self.index)} index folder given; a sharded collection has two or more",
                             hint="Serve one index without --shards (or with --replicas N on Ray actors).")
        if not 0 < self.port < 65536:
            raise UsageError(f"--port {self.port}: expected 1-65535")
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            if self.host != "localhost":
                raise UsageError(f"--host {self.host}: expected an IP address (127.0.0.1, 0.0.0.0, ::) or localhost") from None
        for flag, value in (("--max-batch", self.max_batch), ("--max-queries", self.max_queries),
                            ("--max-k", self.max_k), ("--max-query-chars", self.max_query_chars),
                            ("--max-body-bytes", self.max_body_bytes), ("--max-pending", self.max_pending),
                            ("--max-connections", self.max_connections), ("--k", self.k),
                            ("--max-new-tokens", self.max_new_tokens), ("--generate-max-batch", self.generate_max_batch)):
            if value < 1:
                raise UsageError(f"{flag} {value}: expected a positive number")
        for flag, number in (("--batch-window-ms", self.batch_window_ms), ("--timeout", self.timeout_s),
                             ("--reload-interval", self.reload_interval_s),
                             ("--generate-batch-window-ms", self.generate_batch_window_ms)):
            if not number >= 0:
                raise UsageError(f"{flag} {number}: expected a non-negative number")
        if self.timeout_s == 0:
            raise UsageError("--timeout 0: expected a positive number of seconds")
        if self.max_pending < self.max_queries:
            raise UsageError(f"--max-pending {self.max_pending} is below --max-queries {self.max_queries}: "
                             "no request could be queued")
        if self.replicas < 0:
            raise UsageError(f"--replicas {self.replicas}: expected 0 (in-process) or more")
        if self.model is None:
            given = [flag for flag, value, default in (
                ("--arch", self.arch, "rag"), ("--max-new-tokens", self.max_new_tokens, 32),
                ("--generator-backend", self.generator_backend, "transformers"), ("--dtype", self.dtype, "auto"))
                if value != default]
            if given:
                raise UsageError(f"{given[0]} sets up generation: give --model too")
        elif self.arch not in GENERATING_ARCHS:
            raise UsageError(f"--arch {self.arch}: the server generates with one of {', '.join(GENERATING_ARCHS)}")
        if self.api_key is not None and len(self.api_key) < 16:
            raise UsageError("--api-key: use at least 16 characters (e.g. `python -c 'import secrets; "
                             "print(secrets.token_urlsafe())'`)")

    @property
    def public(self) -> bool:
        """Bound to more than loopback."""
        if self.host == "localhost":
            return False
        return not ipaddress.ip_address(self.host).is_loopback
