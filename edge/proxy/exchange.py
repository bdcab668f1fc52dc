"""The state of one /v1 request, shared by the handler and the request-body stream.

A client that leaves, before or after the first upstream byte, cancels the request's task at
once, so the upstream request is closed, its pool slot freed, and the provider stops
generating. edge's server protocol reports the lost connection (`ClientLink`, in the scope);
no task or timer per request watches for it.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import secrets
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from time import perf_counter
from typing import IO, TYPE_CHECKING, Any

from edge import errors
from edge.errors import Headers
from edge.metrics.registry import NO_PLAN
from edge.proxy.admission import Decision, rate_limit_headers
from edge.proxy.policy import BodyModel, body_model
from edge.transport.link import CLIENT, ClientLink

if TYPE_CHECKING:
    from edge.proxy.tracing import RequestTrace

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
SPOOL_IN_MEMORY = 1024 * 1024  # a spooled chunked body beyond this goes to a temporary file
SPOOL_READ = 64 * 1024


class BodyTooLarge(Exception):
    """The request body crossed `server.max_body_bytes` while streaming up."""


class ClientGone(Exception):
    """The client disconnected while its body was streaming up."""


_ID_PREFIX = secrets.token_hex(6).encode()  # this process's; with a counter, ids are unique
_IDS = itertools.count()
REQUEST_ID_BYTES = 200


def new_request_id() -> bytes:
    """`req_` and 24 hex characters, unique without a syscall."""
    return b"req_%s%012x" % (_ID_PREFIX, next(_IDS) & 0xFFFFFFFFFFFF)


def client_request_id(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """A client's `X-Request-Id`, when it is 1-200 printable ASCII characters without spaces
    (anything else could break a log line or a header): else None."""
    for name, value in headers:
        if name == b"x-request-id":
            ok = 0 < len(value) <= REQUEST_ID_BYTES and not BAD_ID_BYTE.search(value)
            return value if ok else None
    return None


BAD_ID_BYTE = re.compile(rb"[^\x21-\x7e]")


class AccessNote:
    """What the request path learns for the access line as it goes (only when the access log
    is on: `access.py`)."""

    __slots__ = (
        "model", "plan", "request_bytes", "response_bytes", "tokens", "ttfb", "upstream_id",
    )  # fmt: skip

    def __init__(self) -> None:
        self.plan: str | None = None  # the key's plan, once it proved itself (authenticated)
        self.model: str | None = None
        self.request_bytes: int | None = None  # as sent upstream
        self.ttfb: float | None = None  # seconds
        self.upstream_id: str | None = None
        self.response_bytes = 0
        self.tokens: tuple[int, int] | None = None  # input, output (metered requests)


class Exchange:
    __slots__ = (
        "client_gone",
        "decision",
        "early_body",
        "finished",
        "kid",
        "link",
        "model_read",
        "note",
        "outcome",
        "plan",
        "rate_headers",
        "receive",
        "request_id",
        "scope",
        "send",
        "spooled_length",
        "start",
        "started",
        "status",
        "task",
        "too_large",
        "trace",
    )

    def __init__(
        self, scope: Scope, receive: Receive, send: Send, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.start = perf_counter()
        # with the loop given: without it, current_task() asks for the running loop, which
        # costs a getpid() system call (CPython 3.11), once per request
        self.task: asyncio.Task[Any] | None = asyncio.current_task(loop)
        self.link: ClientLink | None = scope.get(CLIENT)
        self.plan = NO_PLAN  # the metrics label
        self.outcome: str | None = None  # edge_requests_total's outcome, counted at the end
        self.decision: Decision | None = None
        self.rate_headers: Headers = []
        self.started = False  # response headers sent
        self.status = 0  # the status sent, once known
        self.kid: str | None = None  # the presented key's id, once parsed
        self.note: AccessNote | None = None  # what the access log needs, when it is on
        self.finished = False
        self.client_gone = False
        self.too_large = False
        self.early_body: bytes | None = None  # read whole before admission (model scopes)
        self.model_read: BodyModel | None = None  # the body's `model`, parsed once (`model`)
        self.spooled_length: int | None = None  # a chunked body's size, once spooled
        self.request_id: bytes | None = None  # once an error or the access log needs it
        self.trace: RequestTrace | None = None  # its spans, when tracing is on

    def the_request_id(self) -> bytes:
        """The client's `X-Request-Id` when it sent a usable one, else edge's own: on every
        error edge answers, and in the access log, so a user's report can be found."""
        if self.request_id is None:
            self.request_id = client_request_id(self.scope["headers"]) or new_request_id()
        return self.request_id

    @property
    def method(self) -> str:
        return str(self.scope["method"])

    def model(self, body: bytes) -> BodyModel:
        """The body's `model` (`body` is this request's, read whole): parsed the first time it
        is asked for (admission of a scoped key, routing, a 403's wording), kept after."""
        if self.model_read is None:
            self.model_read = body_model(body)
            if self.note is not None:
                self.note.model = self.model_read.model
        return self.model_read

    def admitted(self, decision: Decision, plan: str) -> None:
        self.decision, self.plan, self.outcome = decision, plan, "allowed"
        self.rate_headers = rate_limit_headers(decision)

    async def answer_json(self, body: bytes) -> None:
        """A 200 JSON answer edge made itself (with the rate-limit headers)."""
        self.started, self.status = True, 200
        if self.note is not None:
            self.note.response_bytes = len(body)
        self.stop()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            *self.rate_headers,
        ]
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def fail(self, err: errors.EdgeError, outcome: str, extra: Headers | None = None) -> None:
        """Answer with `err` (plus this request's rate-limit headers) and record the outcome.

        A request whose body is still arriving is answered without reading the rest, and its
        connection closes after the answer: a refused client (a stranger, perhaps) never gets
        to make edge read, hold or parse its upload."""
        self.outcome = outcome
        self.status = err.status
        if self.note is not None:
            self.note.response_bytes = len(err.body())
        link = self.link
        if link is not None and link.cycle.more_body:
            link.end_after_answer()
        headers = self.rate_headers + extra if extra else list(self.rate_headers)
        headers.append((b"x-request-id", self.the_request_id()))
        await errors.send_error(self.send, err, headers)

    async def read_body(self, max_body: int, framed: bool) -> bytes:
        """The whole body, read now (at most `max_body` bytes) and kept for the upstream: only
        for keys whose model scopes need the body's `model` before admission."""
        if self.early_body is None:
            parts = []
            data = await self.request_body(max_body, framed)
            if isinstance(data, bytes):
                parts.append(data)
            elif data is not None:
                parts += [chunk async for chunk in data]
            self.early_body = b"".join(parts)
        return self.early_body

    async def request_body(
        self, max_body: int, framed: bool
    ) -> bytes | AsyncIterator[bytes] | None:
        """The body to send upstream, or None when there is none. Raises ClientGone or
        BodyTooLarge.

        One message (or a body read early): bytes. A body with a Content-Length (`framed`,
        already checked against `max_body`): streamed up as it arrives. A chunked body, whose
        size nobody knows in advance: spooled (memory, then a temporary file) until it ends or
        crosses `max_body`, so an oversized one is refused before the upstream sees a byte;
        then sent with its length (`spooled_length`).
        """
        if self.early_body is not None:
            return self.early_body if self.early_body or self.method not in BODYLESS else None
        whole = self.link.whole_body() if self.link is not None else None
        if whole is not None:  # the usual case: the body came with the head
            if len(whole) > max_body:
                self.too_large = True
                raise BodyTooLarge
            self.watch()
            return whole if whole or self.method not in BODYLESS else None
        first = await self.receive()
        if first["type"] == "http.disconnect":
            self.client_gone = True
            raise ClientGone
        body: bytes = first.get("body", b"")
        if len(body) > max_body:
            self.too_large = True
            raise BodyTooLarge
        if first.get("more_body", False):
            return self._upload(body, max_body) if framed else await self._spool(body, max_body)
        self.watch()
        return body if body or self.method not in BODYLESS else None

    async def _upload(self, first: bytes, max_body: int) -> AsyncIterator[bytes]:
        total = len(first)
        if first:
            yield first
        while True:
            msg = await self.receive()
            if msg["type"] == "http.disconnect":
                self.client_gone = True
                raise ClientGone
            chunk: bytes = msg.get("body", b"")
            total += len(chunk)
            if total > max_body:
                self.too_large = True
                raise BodyTooLarge
            if chunk:
                yield chunk
            if not msg.get("more_body", False):
                break
        self.watch()

    async def _spool(self, first: bytes, max_body: int) -> bytes | AsyncIterator[bytes]:
        """The whole chunked body: in memory up to SPOOL_IN_MEMORY, then in a temporary file
        written from a worker thread (a disk write must not stall every other request)."""
        memory: list[bytes] = []
        size = 0
        file: IO[bytes] | None = None
        try:
            async for chunk in self._upload(first, max_body):
                size += len(chunk)
                if file is not None:
                    await asyncio.to_thread(file.write, chunk)
                    continue
                memory.append(chunk)
                if size > SPOOL_IN_MEMORY:
                    file = await asyncio.to_thread(tempfile.TemporaryFile)
                    await asyncio.to_thread(file.writelines, memory)
                    memory = []
        except BaseException:
            if file is not None:
                file.close()
            raise
        self.spooled_length = size
        if file is None:
            return b"".join(memory)
        await asyncio.to_thread(file.seek, 0)
        return _unspool(file)

    def watch(self) -> None:
        """From now on (the body is fully read), a client that leaves cancels this request at
        once. Raises ClientGone if it already has."""
        link = self.link
        if link is None:  # not under edge's server (in-process tests): nobody reports it
            return
        if link.gone:
            self.client_gone = True
            raise ClientGone
        link.on_gone = self._client_left

    def _client_left(self) -> None:
        if not self.finished and self.task is not None:
            self.client_gone = True
            self.task.cancel()

    def stop(self) -> None:
        """The response is complete (or abandoned): a client leaving now changes nothing."""
        self.finished = True
        if self.link is not None:
            self.link.on_gone = None


async def _unspool(spool: IO[bytes]) -> AsyncIterator[bytes]:
    """A spooled body, read back in pieces (off the event loop); the file goes away however
    the upload ends."""
    with spool:
        while piece := await asyncio.to_thread(spool.read, SPOOL_READ):
            yield piece
