"""Running edge: uvicorn (uvloop + httptools) with edge's HTTP protocol, its listeners, and the
SIGTERM drain; `supervisor.py` runs several of these for `--workers` (and `serve()` chooses).

Drain (docs/guarantees.md): the first SIGTERM makes `/readyz` answer 503 at once while the instance
keeps serving for `server.drain_delay` seconds (the load balancer notices and stops sending);
then the listener closes and in-flight requests, streams included, get `server.drain_timeout`
seconds to finish before they are cut; then the process exits 0. A second SIGTERM skips the
rest of the delay; SIGINT (Ctrl+C) stops without one.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
from types import FrameType
from typing import cast

import uvicorn

from edge.app import Edge, Signals, create_app
from edge.banner import announce
from edge.runtime import Runtime, create_demo_key
from edge.setting_changes import Source
from edge.settings import Settings
from edge.transport.protocol import Limits, protocol_class

log = logging.getLogger("edge")


class EdgeServer(uvicorn.Server):
    """uvicorn's server, with edge's drain on SIGTERM."""

    def __init__(self, config: uvicorn.Config, app: Edge, drain_delay: float) -> None:
        super().__init__(config)
        self.edge = app
        self.drain_delay = drain_delay

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        settle_heap()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM:
            super().handle_exit(sig, frame)
            return
        if self.edge.draining or self.drain_delay <= 0:
            self.edge.draining = True
            self.should_exit = True  # not a re-raised SIGTERM: a drained exit is a clean one
            return
        self.edge.draining = True
        log.info(
            "SIGTERM: draining; /readyz answers 503, requests are served for %.1f s more",
            self.drain_delay,
        )
        try:
            asyncio.get_running_loop().call_later(self.drain_delay, self._close)
        except RuntimeError:  # not serving yet
            self.should_exit = True

    def _close(self) -> None:
        log.info(
            "drain delay over: closing the listener; in-flight requests have %.1f s",
            self.config.timeout_graceful_shutdown or 0,
        )
        self.should_exit = True


def settle_heap() -> None:
    """Once the app is up: collect what start-up left, then move every object alive now (the
    modules, settings, scripts, pools: some 60,000 objects) out of the collector's sight
    (`gc.freeze`). A full collection then walks only what was made since. Measured under
    short answers (benchmarks/gc_pauses.py): a full collection once a second, which walked
    the start-up heap for 19-36 ms with the loop stopped, the 32-connection p99."""
    gc.collect()
    gc.freeze()


def listen(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket, inheritable so a worker process can serve it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def listeners(settings: Settings, reuse_port: bool = False) -> list[socket.socket]:
    """The main listener, and the admin listener when `admin.port` is set."""
    socks = [listen(settings.server.host, settings.server.port, reuse_port)]
    if settings.admin.port:
        socks.append(listen(settings.admin.host, settings.admin.port, reuse_port))
    return socks


def worker_listeners(settings: Settings, workers: int) -> list[list[socket.socket]]:
    """One set of listeners per worker, all on the same ports (SO_REUSEPORT), so the kernel
    spreads new connections over the workers. One shared socket does not: the first worker
    to wake accepts every connection waiting, and with persistent connections (a load
    balancer's, wrk's) that worker keeps them all (measured: 32 of 32 on one of two).

    The ports are first bound without SO_REUSEPORT and released, so a port another process
    holds is still an error here rather than silently shared with it."""
    for sock in listeners(settings):
        sock.close()
    return [listeners(settings, reuse_port=True) for _ in range(workers)]


def uvicorn_config(app: Edge, settings: Settings) -> uvicorn.Config:
    s = settings.server
    return uvicorn.Config(
        app,
        loop="uvloop",
        interface="asgi3",  # Edge.__call__ returns its coroutine: not detectable as ASGI 3
        http=protocol_class(Limits.of(s)),
        ws="none",  # edge proxies HTTP only; an Upgrade request is served as plain HTTP
        lifespan="on",
        access_log=False,
        server_header=False,
        proxy_headers=False,  # X-Forwarded-* are handled by edge itself (server.trusted_proxies)
        log_config=None,
        # uvicorn annotates these as int but uses them as delays (call_later, wait_for):
        # the configured seconds are honoured exactly, never rounded.
        timeout_keep_alive=cast(int, s.keepalive_timeout),
        timeout_graceful_shutdown=cast(int, s.drain_timeout),
    )


def run_server(
    settings: Settings,
    sockets: list[socket.socket],
    banner: bool = True,
    demo_key: bool = False,
    source: Source | None = None,
    signals: Signals | None = None,
    show_admin_token: bool = False,
) -> int:
    """Serve on `sockets` until stopped; 0 after a clean stop. `source`: where a reload reads
    the configuration; `signals`: how SIGHUP reloads it (edge/reload.py)."""

    async def on_ready(rt: Runtime) -> None:
        await create_demo_key(rt, asked=demo_key)
        announce(rt, show_admin_token)

    app = create_app(settings, on_ready if banner else None, source, signals)
    server = EdgeServer(uvicorn_config(app, settings), app, settings.server.drain_delay)
    server.run(sockets=sockets)
    return 0 if server.started else 1
