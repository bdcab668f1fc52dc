"""An OpenAI-style upstream over TLS on loopback: tests/support/named_upstream.py's server
(chat completions, models, `x-upstream-name`, a record of every request) with a certificate
from tests/support/tls.py's private CA (SAN IP:127.0.0.1, DNS:localhost).

  `require_client_cert=True`  mutual TLS: a client certificate signed by the CA is required
                              (the handshake fails without one); `peers` notes, per request,
                              the client certificate's subject CN.
  `hosts`                     the loopback addresses it listens on, all on one port: listening
                              on 127.0.0.2 as well lets a test reach it by an address its
                              certificate does not list (Linux routes all of 127/8 to lo).
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from aiohttp import web

from tests.support.named_upstream import NamedUpstream
from tests.support.tls import Certs


class TlsUpstream(NamedUpstream):
    def __init__(
        self,
        name: str,
        certs: Certs,
        *,
        require_client_cert: bool = False,
        hosts: tuple[str, ...] = ("127.0.0.1",),
        models: list[str] | None = None,
    ) -> None:
        super().__init__(name, models)
        self.certs = certs
        self.require_client_cert = require_client_cert
        self.hosts = hosts
        self.peers: list[str | None] = []

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def url_for(self, host: str) -> str:
        """The OpenAI base URL through another of its addresses (or `localhost`)."""
        return f"https://{host}:{self.port}/v1"

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.certs.server_cert, self.certs.server_key)
        if self.require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(self.certs.ca_cert)
        return ctx

    async def _sites(self, runner: web.AppRunner) -> None:
        """TLS on every address in `hosts`, one port."""
        loop = self._loop
        assert loop is not None
        loop.set_exception_handler(_quiet_handshakes)
        context = self.context()
        for host in self.hosts:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, self.port))  # the first binds port 0: a free one
            self.port = sock.getsockname()[1]
            await web.SockSite(runner, sock, ssl_context=context, backlog=128).start()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        self.peers.append(_common_name(peer))
        return await super()._handle(request)


def _common_name(cert: Any) -> str | None:
    """The subject CN of a certificate as `SSLSocket.getpeercert()` gives it."""
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None


def _quiet_handshakes(loop: Any, context: dict[str, Any]) -> None:
    """Failed handshakes are what these tests provoke: not worth a traceback on stderr."""
    if isinstance(context.get("exception"), ssl.SSLError | ConnectionError):
        return
    loop.default_exception_handler(context)
