"""One keep-alive connection to the upstream: it writes a request (streaming its body up),
parses the answer with httptools and feeds it to a `Response`, enforces the read deadline, and
goes back to its pool only after a whole exchange (the package's docstring says why).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

import httptools

from edge.transport.upstream.errors import BadResponse, Disconnected, ReadTimeout, UpstreamError
from edge.transport.upstream.response import Response

BodyData = bytes | AsyncIterator[bytes] | None
MERGE_UNDER = 64 * 1024  # a body this small goes out in one write with its head
INFORMATIONAL = (100, 103)  # 1xx answers that precede the real one


class Owner(Protocol):
    """The pool a connection belongs to, as the connection uses it."""

    loop: asyncio.AbstractEventLoop
    max_head_bytes: int
    max_head_fields: int

    def release(self, conn: Connection) -> None:
        """A connection whose exchange is whole: to a waiting request, or to the idle stack."""

    def forget(self, conn: Connection) -> None:
        """A connection closed: its slot is free."""

    def note_session(self, conn: Connection) -> None:
        """A connection's first answer is whole (before its `release`): its TLS session may
        serve the next connections."""


def head_size(headers: list[tuple[bytes, bytes]]) -> int:
    """A head's header fields in bytes, as sent (name, ": ", value, CRLF)."""
    return sum(len(name) + len(value) + 4 for name, value in headers)


class Connection(asyncio.Protocol):
    """One keep-alive connection; serves one response at a time."""

    def __init__(self, pool: Owner) -> None:
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
            else:
                resp.end_of_read()  # one hand-over per read, however many chunks it held

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:  # never made (a TLS handshake in a tunnel failed): the
            return  # pool counted no connection for it
        self.closed = True
        self._stop_timer()
        resp = self.response
        if resp is not None and not resp.done:
            if resp.head.done() and exc is None and not resp.framed():
                resp.complete()  # an unframed body ends with the connection
            else:
                how = "reset" if exc is not None else "closed"
                where = "mid-body" if resp.head.done() else "before answering"
                resp.fail(Disconnected(f"the upstream {how} the connection {where}"))
        self._wake_writer()
        self.pool.forget(self)

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

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
        self.response.feed(body)  # type: ignore[union-attr]

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
        if resp.paused or self.uploading:
            self.last = now
        elif now - self.last >= timeout:
            what = "its response headers" if not resp.head.done() else "the next body piece"
            resp.fail(ReadTimeout(f"no bytes from the upstream for {timeout:g} s ({what})"))
            self.close()
            return
        self._timer = self.loop.call_at(self.last + timeout, self._check_read, timeout)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _finish(self, resp: Response) -> None:
        resp.complete()
        self.response = None
        if self.reusable and self.sent_whole and not self.closed and not self.uploading:
            if not self.reused:
                self.pool.note_session(self)
            self.reused = True
            self.pool.release(self)
        else:
            self.close()

    def _broken(self, resp: Response, error: UpstreamError) -> None:
        resp.fail(error)
        self.close()

    def _wake_writer(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
