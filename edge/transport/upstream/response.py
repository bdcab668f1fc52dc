"""One upstream answer as the proxy sees it: status and headers, then the body, read in pieces
or piped to a sink from the connection's own callback.

The response owns the read-pause state of its connection: it pauses reading when it holds
`HIGH_WATER` unread bytes or its sink can take no more, and resumes when they are taken. The
connection feeds it through the methods under "Fed by the connection", and reaches nothing
else of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from edge.transport.upstream.errors import UpstreamError

Sink = Callable[[bytes, bool], bool]  # (data, more) -> whether it can take more now
HIGH_WATER = 256 * 1024  # buffered, unread response bytes before reading pauses


class Reader(Protocol):
    """The connection an answer arrives on, as the answer uses it."""

    loop: asyncio.AbstractEventLoop
    last: float  # loop time the upstream last sent a byte

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...


class Response:
    """One upstream answer: its status and raw headers once `request()` returns, then its body
    in pieces from `read()`. The connection goes back to the pool as soon as the last byte is
    in, before the client has been sent it."""

    __slots__ = (
        "_error",
        "_loop",
        "_paused",
        "_pieces",
        "_piped",
        "_reader",
        "_sink",
        "_size",
        "_waiter",
        "done",
        "head",
        "headers",
        "is_head",
        "status",
        "tail",
    )

    def __init__(self, reader: Reader, is_head: bool) -> None:
        self._reader: Reader | None = reader
        self.is_head = is_head
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head: asyncio.Future[None] = reader.loop.create_future()
        self.done = False  # the whole body is in: what is buffered is the rest of it
        self._pieces: list[bytes] = []
        self._size = 0
        self._paused = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._loop = reader.loop
        self._sink: Sink | None = None
        self._piped: asyncio.Future[None] | None = None
        self.tail = b""  # the last bytes handed to the sink (where an SSE stream stands)

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
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the answer arrives on."""
        return self._loop

    @property
    def has_body(self) -> bool:
        """Whether body bytes have arrived that nobody has taken yet."""
        return bool(self._pieces)

    @property
    def paused(self) -> bool:
        """Reading is paused on this answer's behalf (edge is holding the upstream back)."""
        return self._paused

    @property
    def last_read(self) -> float:
        """Loop time the upstream last sent a byte of this answer (now, once it is whole)."""
        reader = self._reader
        return reader.last if reader is not None else self._loop.time()

    @property
    def between_events(self) -> bool:
        """A piped SSE body stands between two events: nothing relayed yet, or the last piece
        ended with the blank line that ends an event."""
        tail = self.tail
        return not tail or tail.endswith((b"\n\n", b"\r\n\r\n", b"\r\r"))

    def resume(self) -> None:
        """The sink can take more again: read from the upstream again."""
        self._set_paused(False)

    async def read(self) -> bytes:
        """The body bytes that arrived since the last call; b"" once the body has ended.
        Raises `UpstreamError` when the upstream cut it (after the bytes that did arrive)."""
        while True:
            pieces = self._pieces
            if pieces:
                data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                pieces.clear()
                self._size = 0
                self._set_paused(False)
                return data
            if self.done:
                return b""
            if self._error is not None:
                raise self._error
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        """Done with this answer: an unfinished one closes its connection, so the upstream
        stops sending (and generating)."""
        reader = self._reader
        if reader is not None and not self.done:
            self._reader = None
            reader.close()

    def framed(self) -> bool:
        """Whether the body has its own length framing (Content-Length or chunked)."""
        for name, value in self.headers:
            lname = name.lower()
            if lname == b"content-length":
                return True
            if lname == b"transfer-encoding" and value.strip().lower() == b"chunked":
                return True
        return self.status in (204, 304)

    def _set_paused(self, paused: bool) -> None:
        """The one place reading is paused or resumed on this answer's behalf."""
        if paused == self._paused:
            return
        reader = self._reader
        if reader is None:
            return
        self._paused = paused
        if paused:
            reader.pause_reading()
        else:
            reader.resume_reading()

    def _to_sink(self, more: bool) -> None:
        pieces = self._pieces
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        self._size = 0
        if not data and more:
            return
        if data:
            self.tail = data[-4:]
        writable = self._sink(data, more)  # type: ignore[misc]
        if not writable and more:
            self._set_paused(True)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # Fed by the connection.

    def feed(self, data: bytes) -> None:
        """Body bytes, as parsed."""
        self._pieces.append(data)
        if self._sink is not None:
            return  # handed over at the end of the socket read (`end_of_read`)
        self._size += len(data)
        if self._size > HIGH_WATER:
            self._set_paused(True)
        self._wake()

    def end_of_read(self) -> None:
        """One read from the socket is parsed: a sink gets what it held, in one piece."""
        if self._sink is not None and self._pieces and not self.done:
            self._to_sink(True)

    def complete(self) -> None:
        """The whole body is in. The connection is no longer this answer's to pause or close."""
        self.done = True
        if not self.head.done():
            self.head.set_result(None)
        self._set_paused(False)  # the parser has the whole answer: nothing waits
        self._reader = None
        if self._sink is not None:
            self._to_sink(False)
            if self._piped is not None and not self._piped.done():
                self._piped.set_result(None)
        self._wake()

    def fail(self, error: UpstreamError) -> None:
        """The answer was cut (or never came) with `error`."""
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
