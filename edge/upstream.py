"""The upstream HTTP/1.1 client: a keep-alive connection pool to the one provider origin, on
asyncio's Protocol and httptools' response parser (the C parser uvicorn already uses).

Why hand-written: under load, aiohttp's `ClientSession` took 43.6 % of edge's CPU samples
(`benchmarks/profile_edge.py`, 32 connections): per request it builds a `ClientRequest`, a
`CIMultiDict` of headers, a payload object, a `ClientResponse` with its `StreamReader`, trace
hooks and timers, for features edge turns off (cookies, redirects, decompression, proxies,
auto headers). edge needs one origin, bytes in and bytes out. This client writes the request
head as one bytes join, feeds the answer to httptools, and hands body pieces over as they
arrive; see the README's Performance section for what it bought.

Semantics kept from the aiohttp version (tests/test_upstream_faults_e2e.py holds them):
- a request the upstream provably never received (connect refused or timed out, no pool slot
  in time) raises with `never_sent`, so its credit is refunded;
- only an idempotent request is sent again, once, and only when a reused keep-alive
  connection was found closed before any byte of an answer (RFC 9112 §9.3.1); a POST never is;
- a body without length framing ends when the connection does: a clean close ends it, a reset
  cuts it (`read()` raises), as does any close mid-way through a framed body;
- a connection goes back to the pool only when both directions are complete: the whole request
  body was written and the whole answer read. An upstream that answers before taking the whole
  body ends the upload, and its connection is closed after the answer: were it reused, the next
  request would be read as the rest of the abandoned body (a cross-tenant leak);
- what is not an HTTP/1.1 answer edge can relay is a `BadResponse` (502): a head over
  `max_head_bytes` or `max_head_fields`, a status outside 200-599 (1xx other than 100 and 103,
  which precede the answer), a transfer coding other than plain chunked (as nginx refuses it:
  edge re-frames answers, so it could not pass such a coding on faithfully);
- `connect_timeout` bounds the wait for a pool slot plus the TCP/TLS connect; `read_timeout`
  bounds each silence of the upstream (before its headers, between two body pieces), not the
  whole exchange, so a stream may last as long as it keeps sending.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import httptools

BodyData = bytes | AsyncIterator[bytes] | None
Sink = Callable[[bytes, bool], bool]  # (data, more) -> whether it can take more now
HIGH_WATER = 256 * 1024  # buffered, unread response bytes before reading pauses
MERGE_UNDER = 64 * 1024  # a body this small goes out in one write with its head
KEEPALIVE = 30.0  # seconds an idle pooled connection is kept
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
INFORMATIONAL = (100, 103)  # 1xx answers that precede the real one


class UpstreamError(Exception):
    """The exchange with the upstream failed. `timeout`: a deadline passed; `never_sent`: the
    upstream provably never received the request."""

    timeout = False
    never_sent = False


class ConnectFailed(UpstreamError):
    never_sent = True


class ConnectTimeout(UpstreamError):
    timeout = never_sent = True


class ReadTimeout(UpstreamError):
    timeout = True


class Disconnected(UpstreamError):
    """The connection closed or reset before the answer was whole."""


class BadResponse(UpstreamError):
    """The upstream's bytes are not an HTTP/1.1 response."""


def head_size(headers: list[tuple[bytes, bytes]]) -> int:
    """A head's header fields in bytes, as sent (name, ": ", value, CRLF)."""
    return sum(len(name) + len(value) + 4 for name, value in headers)


def describe(exc: BaseException) -> str:
    """An exception's class and message, without a URL's query string."""
    text = str(exc).split("?", 1)[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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


class Response:
    """One upstream answer: its status and raw headers once `request()` returns, then its body
    in pieces from `read()`. The connection goes back to the pool as soon as the last byte is
    in, before the client has been sent it."""

    __slots__ = (
        "_conn",
        "_error",
        "_loop",
        "_paused",
        "_pieces",
        "_piped",
        "_sink",
        "_size",
        "_waiter",
        "done",
        "head",
        "headers",
        "is_head",
        "status",
    )

    def __init__(self, conn: Connection, is_head: bool) -> None:
        self._conn: Connection | None = conn
        self.is_head = is_head
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head: asyncio.Future[None] = conn.loop.create_future()
        self.done = False  # the whole body is in: what is buffered is the rest of it
        self._pieces: list[bytes] = []
        self._size = 0
        self._paused = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._loop = conn.loop
        self._sink: Sink | None = None
        self._piped: asyncio.Future[None] | None = None

    def pipe(self, sink: Sink) -> asyncio.Future[None]:
        """Hand the body to `sink` from now on, as it arrives, instead of keeping it for
        `read()`: `sink(data, more)` is called from the connection's own callback, once per
        read from the socket (and once with `more=False` at the end), so streaming costs no
        task wake-up per piece. A sink that answers False cannot take more for now: reading
        from the upstream pauses until `resume()`.

        The returned future completes when the body has ended, or fails with the
        `UpstreamError` that cut it (after the bytes that did arrive went to the sink)."""
        self._sink = sink
        fut = self._piped = self._loop.create_future()
        if self._pieces or self.done:
            self._to_sink(not self.done)
        if self.done:
            fut.set_result(None)
        elif self._error is not None:
            fut.set_exception(self._error)
        return fut

    @property
    def has_body(self) -> bool:
        """Whether body bytes have arrived that nobody has taken yet."""
        return bool(self._pieces)

    def resume(self) -> None:
        """The sink can take more again: read from the upstream again."""
        if self._paused and self._conn is not None:
            self._paused = False
            self._conn.transport.resume_reading()

    def _to_sink(self, more: bool) -> None:
        pieces = self._pieces
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        self._size = 0
        if not data and more:
            return
        writable = self._sink(data, more)  # type: ignore[misc]
        if not writable and more and not self._paused and self._conn is not None:
            self._paused = True
            self._conn.transport.pause_reading()

    async def read(self) -> bytes:
        """The body bytes that arrived since the last call; b"" once the body has ended.
        Raises `UpstreamError` when the upstream cut it (after the bytes that did arrive)."""
        while True:
            pieces = self._pieces
            if pieces:
                data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                pieces.clear()
                self._size = 0
                if self._paused and self._conn is not None:
                    self._paused = False
                    self._conn.transport.resume_reading()
                return data
            if self.done:
                return b""
            if self._error is not None:
                raise self._error
            waiter = self._waiter = self._conn.loop.create_future()  # type: ignore[union-attr]
            try:
                await waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        """Done with this answer: an unfinished one closes its connection, so the upstream
        stops sending (and generating)."""
        conn = self._conn
        if conn is not None and not self.done:
            self._conn = None
            conn.close()

    def framed(self) -> bool:
        """Whether the body has its own length framing (Content-Length or chunked)."""
        for name, value in self.headers:
            lname = name.lower()
            if lname == b"content-length":
                return True
            if lname == b"transfer-encoding" and value.strip().lower() == b"chunked":
                return True
        return self.status in (204, 304)

    # Called by the connection.

    def _feed(self, data: bytes) -> None:
        self._pieces.append(data)
        if self._sink is not None:
            return  # handed over at the end of the socket read (Connection.data_received)
        self._size += len(data)
        if self._size > HIGH_WATER and not self._paused and self._conn is not None:
            self._paused = True
            self._conn.transport.pause_reading()
        self._wake()

    def _complete(self) -> None:
        self.done = True
        if not self.head.done():
            self.head.set_result(None)
        if self._sink is not None:
            self._to_sink(False)
            if self._piped is not None and not self._piped.done():
                self._piped.set_result(None)
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if self.done or self._error is not None:
            return
        self._error = error
        if not self.head.done():
            self.head.set_exception(error)
            self.head.exception()  # retrieved here; request() re-raises it
        if self._sink is not None:
            if self._pieces:
                self._to_sink(True)  # what did arrive, then the cut
            if self._piped is not None and not self._piped.done():
                self._piped.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Connection(asyncio.Protocol):
    """One keep-alive connection; serves one response at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.closed = False
        self.reusable = True
        self.reused = False  # it has carried an answer before
        self.got_bytes = False  # of the current answer
        self.uploading = False  # a streamed request body is still going up
        self.sent_whole = False  # the current request went out whole, body included
        self.head_bytes = 0  # bytes read while the current answer's head(s) arrived
        self.odd_coding = False  # the answer names a transfer coding other than chunked
        self.idle_since = 0.0
        self.last = 0.0  # when the upstream last sent a byte (or the current request began)
        self._timer: asyncio.TimerHandle | None = None  # the read deadline (see _check_read)
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        resp = self.response
        if resp is None:  # bytes nobody asked for, on an idle connection
            self.close()
            return
        self.got_bytes = True
        self.last = self.loop.time()
        heading = not resp.head.done()
        if heading:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._broken(resp, BadResponse("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            cause = exc.__context__  # raised by one of the callbacks below
            if not isinstance(cause, BadResponse):
                cause = BadResponse(f"unparseable response from the upstream ({exc})")
            self._broken(resp, cause)
        else:
            if heading and not resp.head.done() and self.head_bytes > self.pool.max_head_bytes:
                self._broken(resp, self._head_too_large())
            elif resp._sink is not None and resp._pieces and not resp.done:
                resp._to_sink(True)  # one hand-over per read, however many chunks it held

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        resp = self.response
        if resp is not None and not resp.done:
            if resp.head.done() and exc is None and not resp.framed():
                resp._complete()  # an unframed body ends with the connection
            else:
                how = "reset" if exc is not None else "closed"
                where = "mid-body" if resp.head.done() else "before answering"
                resp._fail(Disconnected(f"the upstream {how} the connection {where}"))
        self._wake_writer()
        self.pool._forget(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writer()

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.response.headers.append((name, value))  # type: ignore[union-attr]
        if len(name) == 17 and name.lower() == b"transfer-encoding":
            self.odd_coding |= value.strip().lower() != b"chunked"

    def on_headers_complete(self) -> None:
        """Raising here stops the parser; data_received reports the error (a 502)."""
        resp = self.response
        assert resp is not None
        pool = self.pool
        if len(resp.headers) > pool.max_head_fields:
            raise self._head_too_large()
        # Over the budget in bytes read: measure the head itself (the read may hold body too).
        if self.head_bytes > pool.max_head_bytes and head_size(resp.headers) > pool.max_head_bytes:
            raise self._head_too_large()
        status = self.parser.get_status_code()
        if status in INFORMATIONAL:  # the answer comes after it
            resp.headers = []
            self.odd_coding = False
            return
        if not 200 <= status <= 599:
            raise BadResponse(f"the upstream answered with status {status}")
        if self.odd_coding:  # edge re-frames answers: it could not pass such a coding on
            raise BadResponse("the upstream used a transfer coding other than chunked")
        resp.status = status
        if not self.parser.should_keep_alive():
            self.reusable = False
        resp.head.set_result(None)
        if resp.is_head:  # a HEAD answer has no body whatever its headers say
            self.reusable = False  # (and httptools cannot be told so: don't reuse the parser)
            self._finish(resp)

    def on_body(self, body: bytes) -> None:
        self.response._feed(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        resp = self.response
        if resp is not None and resp.head.done() and not resp.done:
            self._finish(resp)

    def _head_too_large(self) -> BadResponse:
        pool = self.pool
        return BadResponse(
            f"the upstream's response head is over {pool.max_head_bytes} bytes "
            f"or {pool.max_head_fields} fields"
        )

    # Used by the pool and the response.

    async def exchange(
        self, head: bytes, body: BodyData, is_head: bool, read_timeout: float
    ) -> Response:
        resp = self.response = Response(self, is_head)
        self.got_bytes = False
        self.sent_whole = False
        self.head_bytes = 0
        self.odd_coding = False
        transport = self.transport
        try:
            if body is None:
                transport.write(head)
                self.sent_whole = True
            elif isinstance(body, bytes):
                if len(body) < MERGE_UNDER:
                    transport.write(head + body)
                else:
                    transport.writelines((head, body))
                self.sent_whole = True  # in the transport's buffer, in order: it will all go
            else:
                transport.write(head)
                self.uploading = True
                try:
                    self.sent_whole = await self._upload(body, resp)
                finally:
                    self.uploading = False
                if not self.sent_whole:  # answered before the upload ended: never reused
                    self.reusable = False
                    if resp.done:
                        self.close()
            self.last = self.loop.time()
            if self._timer is None:
                self._timer = self.loop.call_at(
                    self.last + read_timeout, self._check_read, read_timeout
                )
            await resp.head
        except BaseException:
            if not resp.done:
                self.close()
            raise
        return resp

    async def _upload(self, body: AsyncIterator[bytes], resp: Response) -> bool:
        """Stream a body up, pausing while the transport's buffer is full; True when all of
        it was written. An upstream that answers before taking it all ends the upload: the
        rest is not sent (and the connection must not be reused)."""
        async for chunk in body:
            if self.closed or resp.head.done():
                return False
            self.transport.write(chunk)
            if self._write_paused:
                self._drained = self.loop.create_future()
                try:
                    await self._drained
                finally:
                    self._drained = None
        return not self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._stop_timer()
            self.transport.close()

    def _check_read(self, timeout: float) -> None:
        """The read deadline: the upstream has been silent `timeout` seconds while an answer was
        due (edge holding it back from a slow client, or still uploading, does not count).

        One timer per connection, re-armed when it fires, rather than one per request: it is
        armed by the first request and lapses once the connection sits idle in the pool."""
        self._timer = None
        resp = self.response
        if resp is None or self.closed or resp.done:
            return
        now = self.loop.time()
        if resp._paused or self.uploading:
            self.last = now
        elif now - self.last >= timeout:
            what = "its response headers" if not resp.head.done() else "the next body piece"
            resp._fail(ReadTimeout(f"no bytes from the upstream for {timeout:g} s ({what})"))
            self.close()
            return
        self._timer = self.loop.call_at(self.last + timeout, self._check_read, timeout)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _finish(self, resp: Response) -> None:
        resp._complete()
        if resp._paused:
            self.transport.resume_reading()  # the parser has the whole answer; nothing waits
            resp._paused = False
        resp._conn = None
        self.response = None
        if self.reusable and self.sent_whole and not self.closed and not self.uploading:
            self.reused = True
            self.pool._release(self)
        else:
            self.close()

    def _broken(self, resp: Response, error: UpstreamError) -> None:
        resp._fail(error)
        self.close()

    def _wake_writer(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)


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
    ) -> None:
        self.origin = Origin(url)
        self.loop = asyncio.get_running_loop()
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_head_bytes = max_head_bytes  # an answer's head beyond these: BadResponse
        self.max_head_fields = max_head_fields
        if self.origin.https and ssl_context is None:
            ssl_context = ssl.create_default_context()
        self.ssl = ssl_context
        self._idle: list[Connection] = []  # a stack: the warmest connection is reused first
        self._open = 0  # connections open or being opened
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    def head(
        self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], length: int | None
    ) -> bytes:
        """The request head: request line, Host, the given headers, the body's length."""
        parts = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\nHost: "]
        parts.append(self.origin.host_header)
        parts.append(b"\r\n")
        for name, value in headers:
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
                return await conn.exchange(head, body, is_head, self.read_timeout)
            except Disconnected:
                # A reused connection the upstream had closed before reading a byte of this
                # request: send an idempotent one again, once, on another connection.
                retry = conn.reused and not conn.got_bytes and method in IDEMPOTENT
                if attempt == 2 or not retry or not (body is None or isinstance(body, bytes)):
                    raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectFailed("the upstream pool is closed"))
        await asyncio.sleep(0)  # let the transports close

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
            raise ConnectTimeout(
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
                    self._release(handed)
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    async def _connect(self) -> Connection:
        origin = self.origin
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await self.loop.create_connection(
                    lambda: Connection(self),
                    origin.host,
                    origin.port,
                    ssl=self.ssl,
                    server_hostname=origin.host if self.ssl is not None else None,
                )
        except TimeoutError:
            raise ConnectTimeout(
                f"could not connect to the upstream within {self.connect_timeout:g} s"
            ) from None
        except OSError as exc:  # refused, unreachable, DNS, TLS (ssl.SSLError is an OSError)
            raise ConnectFailed(f"could not connect to the upstream: {exc}") from None
        return conn

    def _release(self, conn: Connection) -> None:
        """A connection whose answer is whole: to a waiting request, or to the idle stack."""
        if self._closed:
            conn.close()
            return
        if self._hand_on(conn):
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

    def _forget(self, conn: Connection) -> None:
        """A connection closed: its slot is free."""
        self._open -= 1
        if conn in self._idle:
            self._idle.remove(conn)
        if not self._closed:
            self._hand_on(None)

    def _sweep_idle(self) -> None:
        """Close connections idle longer than KEEPALIVE (the upstream may drop them anyway)."""
        self._sweep = None
        expired = self.loop.time() - KEEPALIVE
        for conn in [c for c in self._idle if c.idle_since <= expired]:
            conn.close()  # connection_lost removes it from the stack
        if self._idle and not self._closed:
            self._sweep = self.loop.call_later(KEEPALIVE / 2, self._sweep_idle)
