"""The pool of keep-alive connections to the one upstream origin: at most `limit` open (or
opening) at a time, the warmest reused first, a request waiting at most `connect_timeout` for a
connection, the one idempotent retry on a reused connection found closed; and, with
`min_connections`, that many kept open ahead of demand (`warm`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from urllib.parse import urlsplit

from edge.tls_files import ResumingContext, client_context
from edge.transport.upstream.connection import BodyData, Connection
from edge.transport.upstream.errors import ConnectFailed, ConnectTimeout, Disconnected, PoolFull
from edge.transport.upstream.proxy import Proxy, open_tunnel
from edge.transport.upstream.response import Response

KEEPALIVE = 30.0  # seconds an idle pooled connection is kept
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
WARM_AT_ONCE = 8  # connections `warm` opens at the same time
WARM_BACKOFF = (1.0, 30.0)  # seconds before warming again after a failed connect: first, most
WARM_GAP = 1.0  # seconds between two warm-ups at least (an upstream that closes what it accepts)

log = logging.getLogger("edge.upstream")


class Origin:
    """Where the pool connects, and the Host header and path prefix of every request."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        default = parts.port is None or parts.port == (443 if self.https else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if default else f"{host}:{self.port}").encode("ascii")
        self.base_path = parts.path.rstrip("/").encode("ascii")


class UpstreamPool:
    """Keep-alive connections to one origin, at most `limit` open (or opening) at a time."""

    def __init__(
        self,
        url: str,
        limit: int,
        connect_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        max_head_bytes: int = 64 * 1024,
        max_head_fields: int = 100,
        proxy: str | None = None,
        min_connections: int = 0,
    ) -> None:
        self.origin = Origin(url)
        self.proxy = Proxy.of(proxy) if proxy else None
        # an http upstream through a proxy: requests in absolute form, with the proxy's auth
        self._absolute = b""
        self._proxy_auth: list[tuple[bytes, bytes]] = []
        if self.proxy is not None and not self.origin.https:
            self._absolute = b"http://" + self.origin.host_header
            if self.proxy.authorization is not None:
                self._proxy_auth = [(b"Proxy-Authorization", self.proxy.authorization)]
        self.loop = asyncio.get_running_loop()
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_head_bytes = max_head_bytes  # an answer's head beyond these: BadResponse
        self.max_head_fields = max_head_fields
        if self.origin.https and ssl_context is None:
            ssl_context = client_context()
        self.ssl = ssl_context
        self._idle: list[Connection] = []  # a stack: the warmest connection is reused first
        self._open = 0  # connections open or being opened
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False
        self._retired = False
        self.min_connections = min(min_connections, limit)
        self._warming: asyncio.Task[None] | None = None
        self._warm_after = 0.0  # loop time: no warming before (back-off after a failure)
        self._backoff = 0.0

    def head(
        self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], length: int | None
    ) -> bytes:
        """The request head: request line, Host, the given headers, the body's length."""
        parts = [method.encode("ascii"), b" ", self._absolute, target, b" HTTP/1.1\r\nHost: "]
        parts.append(self.origin.host_header)
        parts.append(b"\r\n")
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        for name, value in self._proxy_auth:
            parts += (name, b": ", value, b"\r\n")
        if length is not None:
            parts.append(b"Content-Length: %d\r\n" % length)
        parts.append(b"\r\n")
        return b"".join(parts)

    async def request(
        self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: BodyData,
        length: int | None,
    ) -> Response:  # fmt: skip
        """Send one request (`target`: the path and query, relative to the origin) and return
        the answer once its status and headers are in."""
        head = self.head(method, target, headers, length)
        is_head = method == "HEAD"
        for attempt in (1, 2):
            conn = await self._acquire()
            try:
                resp = await conn.exchange(head, body, is_head, self.read_timeout)
                if self._absolute and resp.status == 407:  # the proxy's answer, not the upstream's
                    resp.close()
                    raise ConnectFailed(
                        f"the egress proxy {self.proxy.shown if self.proxy else ''} answered "
                        "407 (proxy authentication required): the request never reached the "
                        "upstream"
                    )
                return resp
            except Disconnected:
                # A reused connection the upstream had closed before reading a byte of this
                # request: send an idempotent one again, once, on another connection.
                retry = conn.reused and not conn.got_bytes and method in IDEMPOTENT
                if attempt == 2 or not retry or not (body is None or isinstance(body, bytes)):
                    raise
        raise AssertionError("unreachable")

    @property
    def open_count(self) -> int:
        """Connections open or being opened."""
        return self._open

    def warm(self) -> asyncio.Task[None] | None:
        """Open connections in the background until `min_connections` are open (idle or in
        use), WARM_AT_ONCE at a time: a burst of new streams then finds them ready instead
        of each paying a connect (and against https a TLS handshake, about 0.85 ms of CPU:
        benchmarks/tls_burst.py). Called at start-up (awaited for a while, see runtime.py),
        when a connection closes, and after each sweep of idle ones, which closes those idle
        longer than KEEPALIVE as before (the upstream may drop a connection idle that long),
        so those kept are refreshed rather than kept stale. After a failed connect, warming
        waits (1 s, doubling up to 30 s), and two warm-ups are WARM_GAP apart at least.
        Returns the running warm-up, if any."""
        if (
            self._warming is None
            and self._open < self.min_connections
            and not (self._closed or self._retired)
        ):
            self._warming = self.loop.create_task(self._warm())
        return self._warming

    async def _warm(self) -> None:
        try:
            wait = self._warm_after - self.loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            while not (self._closed or self._retired):
                need = min(self.min_connections - self._open, WARM_AT_ONCE)
                if need <= 0:
                    return
                self._open += need
                opened = await asyncio.gather(
                    *(self._connect() for _ in range(need)), return_exceptions=True
                )
                failed = [r for r in opened if not isinstance(r, Connection)]
                for conn in opened:
                    if isinstance(conn, Connection):
                        self.note_session(conn)  # its session, if its ticket is in already
                        self.release(conn)  # to a waiting request, or idle
                for _ in failed:
                    self._open -= 1
                    self._hand_on(None)
                if failed:
                    first, most = WARM_BACKOFF
                    self._backoff = min(max(self._backoff * 2, first), most)
                    self._warm_after = self.loop.time() + self._backoff
                    log.warning(
                        "upstream %s: could not open a connection ahead of demand (%s); "
                        "trying again in %g s",
                        self.origin.host, failed[0], self._backoff,
                    )  # fmt: skip
                    self.loop.call_later(self._backoff, self.warm)  # nothing else may ask
                    return
                self._backoff = 0.0
        finally:
            self._warming = None
            self._warm_after = max(self._warm_after, self.loop.time() + WARM_GAP)

    async def close(self) -> None:
        self._closed = True
        if self._warming is not None:
            self._warming.cancel()
            self._warming = None
        if self._sweep is not None:
            self._sweep.cancel()
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectFailed("the upstream pool is closed"))
        await asyncio.sleep(0)  # let the transports close

    def retire(self) -> None:
        """A reload replaced this pool: the requests using it (streams included) finish on
        it, but no connection is kept idle any more; `close()` at shutdown still applies."""
        self._retired = True  # a warm-up under way stops after its round (release closes)
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    async def _acquire(self) -> Connection:
        idle = self._idle
        if idle:
            expired = self.loop.time() - KEEPALIVE
            while idle:
                conn = idle.pop()
                if not conn.closed and conn.idle_since > expired:
                    return conn
                conn.close()
        if self._closed:
            raise ConnectFailed("the upstream pool is closed")
        if self._open >= self.limit:
            handed = await self._wait_for_slot()
            if handed is not None:
                return handed
        else:
            self._open += 1
        try:
            return await self._connect()
        except BaseException:
            self._open -= 1
            self._hand_on(None)
            raise

    async def _wait_for_slot(self) -> Connection | None:
        """Wait for a released connection (returned) or a freed slot (None, counted as ours)."""
        waiter: asyncio.Future[Connection | None] = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await waiter
        except TimeoutError:
            raise PoolFull(
                f"no upstream connection free within {self.connect_timeout:g} s "
                f"(upstream.max_connections = {self.limit})"
            ) from None
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                handed = waiter.result()  # it arrived as we gave up: pass it on
                if handed is None:
                    self._open -= 1
                    self._hand_on(None)
                else:
                    self.release(handed)
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    async def _connect(self) -> Connection:
        origin = self.origin
        proxy = self.proxy
        try:
            async with asyncio.timeout(self.connect_timeout):
                if proxy is not None and self.ssl is not None:
                    return await self._through_tunnel(proxy)
                host, port = (proxy.host, proxy.port) if proxy else (origin.host, origin.port)
                _, conn = await self.loop.create_connection(
                    lambda: Connection(self),
                    host,
                    port,
                    ssl=self.ssl,
                    server_hostname=origin.host if self.ssl is not None else None,
                )
        except TimeoutError:
            via = f" through the egress proxy {proxy.shown}" if proxy else ""
            raise ConnectTimeout(
                f"could not connect to the upstream{via} within {self.connect_timeout:g} s"
            ) from None
        except OSError as exc:  # refused, unreachable, DNS, TLS (ssl.SSLError is an OSError)
            where = f"the egress proxy {proxy.shown}" if proxy else "the upstream"
            raise ConnectFailed(f"could not connect to {where}: {exc}") from None
        return conn

    async def _through_tunnel(self, proxy: Proxy) -> Connection:
        """An https upstream through the proxy: CONNECT, then TLS to the upstream inside."""
        origin = self.origin
        assert self.ssl is not None
        raw = await open_tunnel(self.loop, proxy, origin.host, origin.port)
        conn = Connection(self)
        try:
            secure = await self.loop.start_tls(raw, conn, self.ssl, server_hostname=origin.host)
        except BaseException:
            raw.close()
            raise
        if secure is None:  # the loop closed it meanwhile
            raise ConnectFailed("the tunnel through the egress proxy closed during TLS")
        conn.connection_made(secure)
        return conn

    def note_session(self, conn: Connection) -> None:
        """Against https, a new connection's TLS session (in by its first answer; TLS 1.3
        sends it after the handshake) is offered by the next connections to this host
        (`ResumingContext`): through uvloop, 759 µs of CPU a new connection instead of 919
        (100 in a row to the compiled upstream)."""
        if isinstance(self.ssl, ResumingContext):
            tls = conn.transport.get_extra_info("ssl_object")
            if tls is not None:
                self.ssl.remember(self.origin.host, tls)

    def release(self, conn: Connection) -> None:
        """A connection whose answer is whole: to a waiting request, or to the idle stack."""
        if self._closed:
            conn.close()
            return
        if self._hand_on(conn):
            return
        if self._retired:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)
        if self._sweep is None:
            self._sweep = self.loop.call_later(KEEPALIVE, self._sweep_idle)

    def _hand_on(self, conn: Connection | None) -> bool:
        """Give a connection (or, None, a free slot) to the longest waiter, if any."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                if conn is None:
                    self._open += 1
                waiter.set_result(conn)
                return True
        return False

    def forget(self, conn: Connection) -> None:
        """A connection closed: its slot is free."""
        self._open -= 1
        if conn in self._idle:
            self._idle.remove(conn)
        handed = not self._closed and self._hand_on(None)
        if not handed and self._open < self.min_connections:
            self.warm()  # (closed or retired: it does nothing)

    def _sweep_idle(self) -> None:
        """Close connections idle longer than KEEPALIVE (the upstream may drop them anyway)."""
        self._sweep = None
        expired = self.loop.time() - KEEPALIVE
        for conn in [c for c in self._idle if c.idle_since <= expired]:
            conn.close()  # connection_lost removes it from the stack (and warms again)
        if self._idle and not self._closed:
            self._sweep = self.loop.call_later(KEEPALIVE / 2, self._sweep_idle)
