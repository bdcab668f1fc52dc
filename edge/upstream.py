"""The upstream HTTP client: how the one pooled aiohttp session is configured, and how its
outcomes read (a body cut by a reset, a request that never left, an error without its URL's
query). Plus the bounded per-process hints the proxy keeps about keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp

from edge.settings import UpstreamSettings

if TYPE_CHECKING:
    from aiohttp.client_proto import ResponseHandler

# Failures that prove the upstream never received the request: its credit is refunded.
NEVER_SENT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


def upstream_session(settings: UpstreamSettings) -> aiohttp.ClientSession:
    """The one pooled upstream client (DESIGN §6, STYLE item 6).

    Bytes pass untouched (no decompression), no cookies are kept between users, no redirects
    are followed, and aiohttp adds no User-Agent, Accept, Accept-Encoding or Content-Type of its
    own. `connect` bounds the wait for a pool slot plus the TCP/TLS connect; `sock_read` bounds
    each read, so a long stream may last as long as it keeps sending.
    """
    connector = aiohttp.TCPConnector(
        limit=settings.max_connections,
        limit_per_host=0,
        ttl_dns_cache=60,
        keepalive_timeout=30,
    )
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=settings.connect_timeout,
        sock_connect=settings.connect_timeout,
        sock_read=settings.read_timeout,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        trust_env=False,
    )


def body_was_reset(protocol: ResponseHandler | None, resp: aiohttp.ClientResponse) -> bool:
    """Whether a body that just ended was cut by a connection reset.

    Only a body without length framing (no Content-Length, not chunked) can end that way
    unnoticed: it ends when the connection does, and aiohttp ends it normally either way. It
    does record why the connection was lost: `ServerDisconnectedError` for a clean close, the
    OS error (e.g. ECONNRESET) otherwise. tests/test_upstream_faults_e2e.py holds edge to
    this, so an aiohttp change shows up there.
    """
    if protocol is None:
        return False
    exc = protocol.exception()  # None while the connection lives: the common, framed case
    if exc is None or isinstance(exc, aiohttp.ServerDisconnectedError):
        return False
    return (
        resp.content_length is None
        and "chunked" not in resp.headers.get("Transfer-Encoding", "").lower()
    )


def describe(exc: BaseException) -> str:
    """An exception's class and message, without a URL's query string."""
    text = str(exc).split("?", 1)[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class KidHints:
    """A bounded set of key ids (kids) with a property worth remembering between requests."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._kids: dict[str, None] = {}

    def __contains__(self, kid: str) -> bool:
        return kid in self._kids

    def note(self, kid: str, present: bool) -> None:
        if not present:
            self._kids.pop(kid, None)
            return
        if len(self._kids) >= self.size:
            del self._kids[next(iter(self._kids))]  # the oldest
        self._kids[kid] = None
