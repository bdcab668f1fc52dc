"""The composition root: `create_app(settings)` builds the ASGI app and owns its resources.

The outermost callable sends `/v1/…` (by its raw path) straight to the raw proxy handler and
everything else (health, metrics) to a small Starlette app, so Starlette's router and
middleware stay off the data path. The lifespan opens Redis, the upstream pool and the
metrics registry, and closes them in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import NamedTuple

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp

from edge import errors
from edge.control.admin_api import AdminApi, admin_enabled
from edge.health import healthz, readyz
from edge.metrics.registry import CONTENT_TYPE
from edge.proxy.exchange import Receive, Scope, Send
from edge.proxy.handler import Proxy
from edge.proxy.policy import API_PREFIX
from edge.reload import Reloader
from edge.runtime import Runtime, open_runtime
from edge.setting_changes import Source
from edge.settings import Settings

log = logging.getLogger("edge")
OnReady = Callable[[Runtime], Awaitable[None]]


async def metrics_endpoint(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime
    request.app.state.edge.proxy.refresh_available()
    return Response(rt.metrics.exposition(), media_type=CONTENT_TYPE)


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return errors.error_response(errors.status_error(exc.status_code))


async def on_error(request: Request, exc: Exception) -> Response:
    # The path's first segment only: the rest may be anything a client typed, a key included.
    area = request.url.path.lstrip("/").split("/", 1)[0][:20]
    log.error("unexpected error on %s /%s/…", request.method, area, exc_info=exc)
    return errors.error_response(errors.EdgeError())


class Deferred:
    """An ASGI app bound at start-up (it needs the runtime's resources); 503 until then."""

    def __init__(self) -> None:
        self.app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.app is None:
            await errors.send_error(send, errors.ServiceUnavailable("edge is starting up."))
        else:
            await self.app(scope, receive, send)


class Edge:
    """The ASGI app: `/v1/*` to the proxy, the rest to a control plane (health, metrics, and
    the admin API and dashboard when an admin token is set).

    With `admin.port`, edge listens twice: the main listener serves `/v1` and health, the
    admin listener health, `/metrics` and `/admin`; each answers a JSON 404 for the other's
    paths. Requests are told apart by the port they arrived on.
    """

    def __init__(
        self,
        settings: Settings,
        on_ready: OnReady | None = None,
        source: Source | None = None,
        signals: Signals | None = None,
    ) -> None:
        self.settings = settings
        self.on_ready = on_ready
        self.source = source or Source()  # where a reload reads the configuration again
        self.signals = signals  # None: no signal handlers (in-process tests)
        self.reloader: Reloader | None = None
        self.proxy = Proxy()
        self.admin = Deferred()
        self.draining = False  # SIGTERM: /readyz answers 503 while requests are still served
        self.admin_port = settings.admin.port
        health: list[BaseRoute] = [Route("/healthz", healthz), Route("/readyz", readyz)]
        operator: list[BaseRoute] = [Route("/metrics", metrics_endpoint)]
        if admin_enabled(settings):
            operator.append(Mount("/admin", app=self.admin))
        public = health if self.admin_port else health + operator
        self.control = self._plane(public, lifespan=True)
        self.operator = self._plane(health + operator) if self.admin_port else self.control

    def _plane(self, routes: list[BaseRoute], lifespan: bool = False) -> Starlette:
        app = Starlette(
            routes=routes,
            exception_handlers={HTTPException: on_http_exception, Exception: on_error},
            lifespan=self._lifespan if lifespan else None,
        )
        app.state.edge = self
        return app

    @contextlib.asynccontextmanager
    async def _lifespan(self, _: Starlette) -> AsyncIterator[None]:
        async with open_runtime(self.settings) as rt:
            self.proxy.bind(rt)
            rt.store.on_change.append(self.proxy.key_changed)
            self.control.state.runtime = self.operator.state.runtime = rt
            supervisor = self.signals.supervisor if self.signals else None
            reloader = self.reloader = Reloader(self.source, rt, self.proxy, supervisor)
            if admin_enabled(self.settings):
                token = self.settings.admin.token.get_secret_value()
                self.admin.app = AdminApi(rt.store, token, self._reload).app
            if self.on_ready is not None:
                await self.on_ready(rt)
            with self._signal_handlers(reloader):
                yield

    async def _reload(self, actor: str) -> list[str]:
        """`POST /admin/reload`: this process, then (with workers) the others."""
        assert self.reloader is not None
        return await self.reloader.reload(actor, siblings=True)

    @contextlib.contextmanager
    def _signal_handlers(self, reloader: Reloader) -> Iterator[None]:
        """SIGHUP reloads (audited by one process: a worker's SIGHUP comes from its
        supervisor, which sends worker 0 the audited one); SIGUSR1 reloads quietly (a sibling
        worker was asked through the admin API and has audited it)."""
        if self.signals is None:
            yield
            return
        loop = asyncio.get_running_loop()
        audited = self.signals.audit
        loop.add_signal_handler(signal.SIGHUP, reloader.on_signal, "signal", audited)
        loop.add_signal_handler(signal.SIGUSR1, reloader.on_signal, "signal", False)
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
            loop.remove_signal_handler(signal.SIGUSR1)

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """Hands back the chosen app's coroutine rather than awaiting it: one frame fewer on
        every resumption of a request (uvicorn is told the interface is ASGI 3)."""
        if scope["type"] != "http":
            return self.control(scope, receive, send)
        if self.admin_port and (scope.get("server") or (None, None))[1] == self.admin_port:
            return self.operator(scope, receive, send)
        # Routed on the raw path, the one the upstream URL is built from: `/%761/…` is not /v1.
        if (scope.get("raw_path") or scope["path"].encode()).startswith(API_PREFIX):
            return self.proxy(scope, receive, send)
        return self.control(scope, receive, send)


class Signals(NamedTuple):
    """How a served process takes SIGHUP: `audit` its reloads (one process of a group does),
    `supervisor` the pid to tell when the admin API asked this one (None: no siblings)."""

    audit: bool = True
    supervisor: int | None = None


def create_app(
    settings: Settings,
    on_ready: OnReady | None = None,
    source: Source | None = None,
    signals: Signals | None = None,
) -> Edge:
    return Edge(settings, on_ready, source, signals)
