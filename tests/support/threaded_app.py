"""An aiohttp application served from its own thread and event loop on a free loopback port:
the life cycle the test-side servers share (the fake, named, paced and TLS upstreams, the OTLP
receiver). A subclass gives `_handle`, and `_sites` when it listens differently."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

from aiohttp import web


class ThreadedApp:
    thread_name = "test-server"
    client_max_size = 64 * 1024 * 1024
    backlog = 1024
    handler_cancellation = True

    def __init__(self) -> None:
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()

    def start(self) -> Any:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"{self.thread_name} did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI base URL edge is pointed at (an upstream's): requests arrive as /v1/…."""
        return f"{self.base}/v1"

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._serve())
        self._loop.run_forever()
        self._loop.run_until_complete(self._shutdown())
        self._loop.close()

    async def _serve(self) -> None:
        app = web.Application(client_max_size=self.client_max_size)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=self.handler_cancellation
        )
        await self._runner.setup()
        await self._sites(self._runner)
        self._ready.set()

    async def _sites(self, runner: web.AppRunner) -> None:
        """Listen: one socket on 127.0.0.1, a free port (`self.port`)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(runner, sock, backlog=self.backlog).start()

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError
