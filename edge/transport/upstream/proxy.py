"""Egress through an HTTP proxy (`upstream.proxy`, or HTTPS_PROXY / HTTP_PROXY / NO_PROXY):
how a company network lets edge reach a provider.

An https upstream is reached through a `CONNECT host:port` tunnel, and TLS to the upstream
runs inside it (the upstream's certificate is checked as it would be directly); an http one
gets its requests in absolute form (`POST http://host/v1/… HTTP/1.1`). Credentials in the
proxy URL go to the proxy as `Proxy-Authorization: Basic …` and to nobody else; the URL is
only ever logged with its password redacted.
"""

from __future__ import annotations

import asyncio
import base64
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

from edge.transport.upstream.errors import ConnectFailed
from edge.urls import redact_url

MAX_CONNECT_ANSWER = 16 * 1024  # a proxy's answer to CONNECT, head only


class Proxy(NamedTuple):
    host: str
    port: int
    authorization: bytes | None  # the Proxy-Authorization value, when the URL has credentials
    shown: str  # the URL, password redacted: for logs and errors

    @classmethod
    def of(cls, url: str) -> Proxy:
        parts = urlsplit(url)
        auth = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            auth = b"Basic " + base64.b64encode(pair.encode())
        return cls(parts.hostname or "", parts.port or 80, auth, redact_url(url))


class Tunnel(asyncio.Protocol):
    """A connection to the proxy until its answer to CONNECT has arrived (then TLS takes the
    transport over: `open_tunnel`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[bytes] = loop.create_future()
        self.received = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.answer.done():
            return  # a refusal's body: its head said it all
        self.received += data
        end = self.received.find(b"\r\n\r\n")
        if end >= 0:  # the head, and whether anything followed it (`open_tunnel` decides)
            self.answer.set_result(self.received[: end + 5])
        elif len(self.received) > MAX_CONNECT_ANSWER:
            self.answer.set_exception(ConnectFailed("the egress proxy's answer is too long"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(
                ConnectFailed("the egress proxy closed the connection before answering CONNECT")
            )


async def open_tunnel(
    loop: asyncio.AbstractEventLoop, proxy: Proxy, host: str, port: int
) -> asyncio.Transport:
    """A transport to `host:port` through the proxy, ready for TLS. Raises ConnectFailed."""
    try:
        transport, tunnel = await loop.create_connection(
            lambda: Tunnel(loop), proxy.host, proxy.port
        )
    except OSError as exc:
        raise ConnectFailed(f"could not connect to the egress proxy {proxy.shown}: {exc}") from None
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    head = "\r\n".join(lines).encode("ascii") + b"\r\n"
    if proxy.authorization is not None:
        head += b"Proxy-Authorization: " + proxy.authorization + b"\r\n"
    transport.write(head + b"\r\n")
    try:
        answer = await tunnel.answer
    except BaseException:
        transport.close()
        raise
    status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].startswith("2"):
        transport.close()
        raise ConnectFailed(
            f"the egress proxy {proxy.shown} answered {status_line[:100]!r} to CONNECT {authority}"
        )
    if not answer.endswith(b"\r\n\r\n"):  # bytes after a 2xx head, before our TLS hello
        transport.close()
        raise ConnectFailed(f"the egress proxy {proxy.shown} sent bytes after its answer")
    return transport
