"""One request's server side as the proxy writes to it: uvicorn's request/response cycle with
edge's own write paths (`EdgeCycle`), the `link.ResponseCycle` the proxy sees."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle


class Lingering:
    """A cycle's transport once its answer must end the connection while the client may still
    be sending (`EdgeHttpToolsProtocol.end_after_answer`): writes pass through, and closing
    is `close`, the protocol's lingering close."""

    def __init__(self, transport: asyncio.Transport, close: Callable[[], None]) -> None:
        self.transport = transport
        self.close = close

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def is_closing(self) -> bool:
        return self.transport.is_closing()


class EdgeCycle(RequestResponseCycle):
    """uvicorn's request/response cycle, plus the proxy's own write paths: `answer()` (a whole
    response in one write), `start_stream()` and `pipe_body()` (a streamed one, written from
    the upstream connection's callback).

    They frame exactly as uvicorn's `send` does (tests/test_framing_e2e.py holds them to it),
    for the proxy's answers only: their header names are lower-case and every name and value
    was either parsed by httptools from the upstream's answer (the parser refuses control
    characters in both) or written by edge, so uvicorn's per-header checks are not run again.
    """

    held: bytes | None = None  # a started stream's head, waiting to leave with its first piece

    def take_body(self) -> bytes | None:
        """The request body if all of it has arrived (and was not asked for yet): what the
        first `receive()` would hand over, without the message and the wait. Else None."""
        if self.more_body or self.disconnected or self.waiting_for_100_continue:
            return None
        body = bytes(self.body)
        self.body = bytearray()
        self.flow.resume_reading()  # as receive() does: a large body may have paused it
        return body

    def _head(self, status: int, headers: list[tuple[bytes, bytes]]) -> tuple[list[bytes], int]:
        """The status line and header lines (without the blank line), and the Content-Length
        given (-1: none, -2: unreadable)."""
        length = -1
        for name, value in headers:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -2
                break
        parts = [STATUS_LINE[status]]
        for name, value in self.default_headers:
            parts += (name, b": ", value, b"\r\n")
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        return parts, length

    def _writable_now(self) -> bool:
        return not (
            self.response_started or self.disconnected or self.flow.write_paused or self.access_log
        )

    def answer(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
        """Write a complete response (head and whole body) in one write and complete the
        cycle. False, having written nothing, wherever uvicorn's own path must run instead
        (the caller then sends ASGI messages)."""
        if self.scope["method"] != "HEAD" and status not in (204, 304):
            if not self.start_stream(status, headers, hold=True):
                return False
            self.pipe_body(body, more=False)  # the held head and the whole body, one write
            return True
        if body or not self._writable_now():  # bodyless answers: the head alone
            return False
        parts, length = self._head(status, headers)
        if length == -2:
            return False
        parts.append(b"\r\n")
        self.response_started = True
        self.waiting_for_100_continue = False
        self.transport.write(b"".join(parts))
        self._complete()
        return True

    def start_stream(self, status: int, headers: list[tuple[bytes, bytes]], hold: bool) -> bool:
        """Start a response whose body follows through `pipe_body`. With `hold` (a first
        piece is already in), the head waits to leave in one write with it. False, having
        written nothing, where uvicorn's `send` must start it instead."""
        if not self._writable_now():
            return False
        if self.scope["method"] == "HEAD" or status in (204, 304):
            return False  # bodyless: rare here (answer() takes those that are whole)
        parts, length = self._head(status, headers)
        if length == -2:
            return False
        if length >= 0:
            self.chunked_encoding = False
            self.expected_content_length = length
            parts.append(b"\r\n")
        else:
            self.chunked_encoding = True
            parts.append(b"transfer-encoding: chunked\r\n\r\n")
        self.response_started = True
        self.waiting_for_100_continue = False
        if hold:
            self.held = b"".join(parts)
        else:
            self.transport.write(b"".join(parts))
        return True

    def pipe_body(self, body: bytes, more: bool) -> bool:
        """One piece of a streamed body, written at once: the body branch of uvicorn's `send`
        (chunk framing or Content-Length accounting, completion), without a task, a message
        or an await, so the upstream's callback can call it for each piece it reads. The
        response must have been started (`start_stream`, or uvicorn's `send`). Returns
        whether the client can take more now (False: its transport's buffer is over the
        high-water mark)."""
        if self.disconnected or self.response_complete:
            return True  # nobody to write to: the request is being cancelled
        out = self.held or b""
        self.held = None
        if self.chunked_encoding:
            if body:
                out += b"%x\r\n%s\r\n" % (len(body), body)
            if not more:
                out += b"0\r\n\r\n"
        elif self.scope["method"] != "HEAD":
            self.expected_content_length -= len(body)
            if self.expected_content_length < 0 or (not more and self.expected_content_length):
                self.transport.close()  # the body does not match its length: cut it
                return True
            out += body
        if out:
            self.transport.write(out)
        if not more:
            self._complete()
        return not self.flow.write_paused

    def _complete(self) -> None:
        """The response is whole: as uvicorn's `send` ends one."""
        self.response_complete = True
        self.message_event.set()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()
