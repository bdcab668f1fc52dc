"""The composition root: `create_app(settings)` builds the ASGI app and owns its resources.

The outermost callable sends `/v1/…` straight to the raw proxy handler and everything else
(health, metrics) to a small Starlette app, so Starlette's router and middleware stay off the
data path. The lifespan opens Redis, the upstream pool and the metrics registry, and closes
them in reverse.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge import errors
from edge.health import healthz, readyz
from edge.metrics import CONTENT_TYPE
from edge.proxy import Proxy
from edge.runtime import Runtime, open_runtime
from edge.settings import Settings

log = logging.getLogger("edge")
OnReady = Callable[[Runtime], Awaitable[None]]


async def metrics_endpoint(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime
    return Response(rt.metrics.exposition(), media_type=CONTENT_TYPE)


def _json_error(err: errors.EdgeError) -> Response:
    return Response(err.body(), status_code=err.status, media_type="application/json")


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _json_error(errors.status_error(exc.status_code))


async def on_error(request: Request, exc: Exception) -> Response:
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return _json_error(errors.EdgeError())


class Edge:
    """The ASGI app: `/v1/*` to the proxy, the rest to the control plane."""

    def __init__(self, settings: Settings, on_ready: OnReady | None = None) -> None:
        self.settings = settings
        self.on_ready = on_ready
        self.proxy = Proxy()
        self.control = Starlette(
            routes=[
                Route("/healthz", healthz),
                Route("/readyz", readyz),
                Route("/metrics", metrics_endpoint),
            ],
            exception_handlers={HTTPException: on_http_exception, Exception: on_error},
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, _: Starlette) -> AsyncIterator[None]:
        async with open_runtime(self.settings) as rt:
            self.proxy.bind(rt)
            self.control.state.runtime = rt
            if self.on_ready is not None:
                await self.on_ready(rt)
            yield

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            await self.proxy(scope, receive, send)
        else:
            await self.control(scope, receive, send)


def create_app(settings: Settings, on_ready: OnReady | None = None) -> Edge:
    return Edge(settings, on_ready)
