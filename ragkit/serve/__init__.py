"""`ragkit serve`: an index (and optionally a reader) behind HTTP.

    from ragkit.serve import ServeConfig, create_app
    app = create_app(ServeConfig(index=["idx/"]))      # any ASGI server runs it; `ragkit serve` uses uvicorn

Searches from concurrent requests are encoded and searched together (`MicroBatcher`); a new index
version published by `ragkit index add/remove/refresh` is picked up between batches, so each request
sees one version (`LiveIndex`)."""

from __future__ import annotations

from typing import Any

__all__ = ["ServeConfig", "create_app", "run"]


def __getattr__(name: str) -> Any:
    if name == "ServeConfig":
        from ragkit.serve.config import ServeConfig

        return ServeConfig
    if name in ("create_app", "run"):
        from ragkit.serve import app

        return getattr(app, name)
    raise AttributeError(name)
