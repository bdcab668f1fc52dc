"""edge's HTTP/1.1 server protocol: uvicorn's httptools protocol, with the limits it lacks and
edge's JSON for the answers it gives itself.

uvicorn (with httptools) puts no bound on a request's headers: httptools accumulates a header's
value however long it grows, any number of headers is accepted, a client may take forever to
send them, and a new connection that sends nothing is never closed. This subclass adds, per
connection, before anything reaches the app (so before Redis or the upstream):

- `server.max_header_bytes`: the request head (request line and headers) is measured as bytes
  arrive, so memory stays bounded: past the limit, 431 and close;
- `server.max_headers`: more header fields than this, 431 and close;
- `server.header_timeout`: a request head not complete this long after its first byte (or
  after the connection opened) gets 408 and close (or just close, if nothing came);
- `server.body_timeout`: a request body that stalls this long between two pieces (while edge
  is reading it) gets 408 and close, or just close once an answer has started: a slow
  uploader cannot hold an upstream connection for ever;
- `server.max_connections`: connections beyond the cap get 503 and close at once.

Trailer fields (after a chunked body) are never request headers: httptools reports them
through the same callback as header fields, and uvicorn appends them to the list it made the
scope's headers, where authentication and forwarding would see them. Here that list is swapped
for a fresh one once the head is complete, so trailers land apart; they are counted against
the same limits as the head (fields and bytes, chunk framing included) and dropped.

uvicorn's own answer to a request it cannot parse (the smuggling probes: Content-Length with
chunked, a bad chunk, an obs-folded header) is text/plain; here it is edge's JSON 400 too.

And what the request path needs, each saving per-request work:
- each request's scope carries a `ClientLink` (`link.py`) through which the protocol reports a
  lost connection the moment it happens, so the proxy needs no watcher task or timer per
  request;
- through the same link the proxy writes its answers itself (`cycle.EdgeCycle`), without ASGI
  messages and uvicorn's per-header checks: a whole one in one write, a streamed one from the
  upstream connection's callback, piece by piece, with backpressure;
- keep-alive idleness is enforced by the connection's one timer (the head timer), not by a
  timer uvicorn arms after every response and cancels on the next request.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from dataclasses import dataclass
from typing import Any, cast

import httptools
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT, service_unavailable
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from edge import errors
from edge.errors import HeadersTooLarge, RequestTimeout
from edge.settings import ServerSettings
from edge.transport.cycle import EdgeCycle, Lingering
from edge.transport.link import CLIENT, ClientLink, ResponseCycle

log = logging.getLogger("edge.http")
HEAD_END = b"\r\n\r\n"
INVALID_REQUEST = errors.BadRequest("Invalid HTTP request received.", code="invalid_http_request")


BODY_TIMEOUT = RequestTimeout("The request body stalled: no part of it arrived in time.")
CHUNK_FRAMING = 32  # bytes of chunk framing (size line, CRLFs) not counted against the limits
# A lingering close (see end_after_answer): how long, and how much, edge goes on
# reading (and dropping) what a refused client still sends, so that closing does not reset
# the connection before the client has read its answer.
LINGER_SECONDS = 2.0
LINGER_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int
    max_headers: int
    header_timeout: float
    max_connections: int  # 0: no cap
    body_timeout: float = 30.0

    @classmethod
    def of(cls, server: ServerSettings) -> Limits:
        return cls(
            server.max_header_bytes,
            server.max_headers,
            server.header_timeout,
            server.max_connections,
            server.body_timeout,
        )


def unlink(link: ClientLink) -> None:
    """Take a request's link out of its scope once its answer is whole (the proxy took it at
    the start): scope → link → cycle → scope is a reference cycle, which left every request's
    cycle, scope and link (and uvicorn's Event) to the garbage collector instead of freeing
    them when the request ended. Measured (benchmarks/gc_pauses.py): 8 objects a request in
    cycles, a generation-2 collection 1.6 times a second at 9,500 req/s, 19-36 ms each."""
    link.cycle.scope.pop(CLIENT, None)  # type: ignore[attr-defined]


def protocol_class(limits: Limits) -> type[EdgeHttpToolsProtocol]:
    """The protocol class uvicorn instantiates per connection, with these limits."""
    return type("EdgeHttpToolsProtocol", (EdgeHttpToolsProtocol,), {"limits": limits})


class EdgeHttpToolsProtocol(HttpToolsProtocol):
    limits = Limits(16 * 1024, 100, 10.0, 0)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # the bytes arriving belong to a request head
        self._head_bytes = 0  # of the current head, so far
        self._tail = b""  # its last 3 bytes, to find a terminator split across reads
        self._fresh_read = False  # the current read began where a head would (measured)
        self._unmeasured = False  # the current head began mid-read: _head_fits did not see it
        self._framing = 0  # body-phase bytes that were not body: chunk framing and trailers
        self._body_seen = 0.0  # loop time a piece of the current request body last arrived
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started: float | None = None  # loop time of the current head's first byte
        self._idle_since: float | None = None  # keep-alive: when the last response completed
        self._links: list[ClientLink] = []  # of the requests whose responses are not complete
        self._refused = False
        self._dropping = False  # a refused request's body is arriving: drop it unparsed
        self._dropped = 0
        self._deferred: errors.EdgeError | None = None  # a refusal waiting for earlier answers

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        cap = self.limits.max_connections
        if cap and len(self.connections) > cap:
            self._refuse(errors.ServiceUnavailable("Too many open connections; try again."))
            return
        self._head_started = self.loop.time()  # a new connection owes a head from now
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._check_head)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)
        links, self._links = self._links, []
        for link in links:
            unlink(link)
            if not link.cycle.response_complete:
                link.gone = True
                if link.on_gone is not None:
                    link.on_gone()

    def resume_writing(self) -> None:
        super().resume_writing()
        for link in self._links:
            if link.on_writable is not None:
                link.on_writable()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._dropping:
            self._dropped += len(data)
            if self._dropped > LINGER_BYTES:
                self.transport.close()
            return
        self._fresh_read = self._in_head and not self._head_bytes and not self._tail
        if not self._in_head:
            self._framing += len(data)  # less the body bytes, once parsed (on_body)
        elif not self._head_fits(data):
            self._refuse_head(self._too_large())
            return
        super().data_received(data)
        if self._in_head or self._refused:
            return
        # A request body is still arriving: bound what is not body, and arm its deadline.
        if self._framing > self.limits.max_header_bytes or not self._trailers_fit():
            self._refuse(self._trailers_too_large())
            return
        self._body_seen = now = self.loop.time()
        due = now + self.limits.body_timeout
        timer = self._head_timer
        if timer is None or timer.when() > due:
            if timer is not None:
                timer.cancel()
            self._head_timer = self.loop.call_at(due, self._check_head)

    def _head_fits(self, data: bytes) -> bool:
        """Count `data` against the head budget; False once the head is over it."""
        if self._head_started is None:
            self._head_started = self.loop.time()  # a request's first byte, kept alive
            self._idle_since = None
        tail = self._tail
        end = (tail + data[:3]).find(HEAD_END) if tail else -1
        if end >= 0:
            end -= len(tail)
        else:
            end = data.find(HEAD_END)
        if end >= 0:
            size = self._head_bytes + end + len(HEAD_END)
            self._head_bytes, self._tail = 0, b""
        else:
            size = self._head_bytes + len(data)
            self._head_bytes, self._tail = size, (tail + data)[-3:]
        return size <= self.limits.max_header_bytes

    def on_message_begin(self) -> None:
        """A request's first byte. Only the first head to begin at the start of a read is
        measured as its bytes arrive (`_head_fits`); any other is measured field by field."""
        self._unmeasured = not self._fresh_read
        self._fresh_read = False
        self.url = b""  # uvicorn's on_message_begin, inline
        self.expect_100_continue = False
        self.headers = []
        self.scope = {  # type: ignore[typeddict-item]
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,  # type: ignore[typeddict-item]
            "root_path": self.root_path,
            "headers": self.headers,
            "state": self.app_state.copy(),
        }

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_started = None
        self._framing = 0
        if self._dropping:  # behind a refused one, in the same read: never served
            return
        if len(self.headers) > self.limits.max_headers:
            self._refuse_head(
                HeadersTooLarge(f"More than {self.limits.max_headers} request header fields.")
            )
            return
        if self._unmeasured:
            # Pipelined: the head began in a read after the end of the request before it,
            # where _head_fits was not looking. Measured field by field instead.
            size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
            if size > self.limits.max_header_bytes:
                self._refuse_head(self._too_large())
                return
        self._start_request()
        self.headers = []  # uvicorn appends trailer fields here: apart from the scope's

    def _start_request(self) -> None:
        """uvicorn's `on_headers_complete` (httptools_impl.py, uvicorn 0.54), making an
        `EdgeCycle` with its `ClientLink` in the scope at once, instead of a plain cycle that
        edge then re-classes: the request's scope and cycle, then its task (or its place in
        the pipeline). Per request, this and uvicorn's other callbacks were most of the
        15 µs the server protocol spent on a request before the app ran."""
        parser = self.parser
        scope = self.scope
        scope["method"] = parser.get_method().decode("ascii")
        http_version = parser.get_http_version()
        if http_version != "1.1":
            scope["http_version"] = http_version
        if parser.should_upgrade() and self._should_upgrade():
            return
        parsed_url = httptools.parse_url(self.url)
        raw_path = parsed_url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        root = self.root_path
        scope["path"] = root + path if root else path
        scope["raw_path"] = root.encode("ascii") + raw_path if root else raw_path
        scope["query_string"] = parsed_url.query or b""
        app = self.app
        if self.limit_concurrency is not None and (
            len(self.connections) >= self.limit_concurrency
            or len(self.tasks) >= self.limit_concurrency
        ):
            app = service_unavailable
            self.logger.warning("Exceeded concurrency limit.")
        existing = self.cycle
        cycle = self.cycle = EdgeCycle(
            scope=scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=self.expect_100_continue,
            keep_alive=http_version != "1.0" and parser.should_keep_alive(),
            on_response=self.on_response_complete,
        )
        link = ClientLink(cycle, self)
        scope[CLIENT] = link  # type: ignore[literal-required]
        self._links.append(link)
        if existing is None or existing.response_complete:
            self._start_asgi_task(cycle, app)
        else:  # pipelined: waits for the answers before it
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, app))

    def on_message_complete(self) -> None:
        self._in_head, self._head_bytes, self._tail = True, 0, b""
        if self._dropping:
            return
        if self.headers and not self._trailers_fit():
            self._refuse(self._trailers_too_large())
            return
        cycle = self.cycle  # uvicorn's on_message_complete, inline
        if cycle is None or cycle.response_complete or self._upgrading():
            return
        cycle.more_body = False
        cycle.message_event.set()

    def _trailers_fit(self) -> bool:
        """Whether the trailer fields received so far (never used: dropped with the request)
        are within the head's limits."""
        trailers = self.headers
        if not trailers:
            return True
        limits = self.limits
        if len(trailers) > limits.max_headers:
            return False
        return sum(len(n) + len(v) + 4 for n, v in trailers) <= limits.max_header_bytes

    def on_body(self, body: bytes) -> None:
        self._framing -= len(body)
        if self._refused or self._dropping:
            return
        cycle = self.cycle  # uvicorn's on_body, inline
        if cycle is None or cycle.response_complete or self._upgrading():
            return
        cycle.body += body
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.message_event.set()

    def _upgrading(self) -> bool:
        """An upgrade request uvicorn hands to its WebSocket protocol (edge serves none)."""
        return self.parser.should_upgrade() and self._should_upgrade()

    def on_chunk_header(self) -> None:
        """Each chunk may bring a little framing; what is beyond it counts against the head's
        limits (so a long chunk extension or trailer section cannot grow without bound)."""
        self._framing = max(0, self._framing - CHUNK_FRAMING)

    def on_response_complete(self) -> None:
        """uvicorn's, except that instead of arming a keep-alive timer after every response
        it notes when the connection went idle; `_check_head` closes it after
        `keepalive_timeout` seconds (uvicorn's `timeout_keep_alive`) of that."""
        self.server_state.total_requests += 1
        links = self._links
        if links and links[0].cycle.response_complete:
            for link in links:
                if link.cycle.response_complete:
                    unlink(link)
            self._links = [k for k in links if not k.cycle.response_complete]
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        if self._deferred is not None:  # every request before the refused one is answered
            self._refuse(self._deferred)
            return
        self._idle_since = self.loop.time()
        if self._head_timer is None:
            self._head_timer = self.loop.call_at(
                self._idle_since + self.timeout_keep_alive, self._check_head
            )

    def send_400_response(self, msg: str) -> None:
        self._refuse(INVALID_REQUEST)

    def end_after_answer(self, cycle: ResponseCycle) -> None:
        """The answer about to be given to `cycle` ends the connection, though the client may
        still be sending its body: edge reads no more of it (what arrives is dropped unparsed,
        up to LINGER_BYTES), and after the answer closes gracefully, half-closing first and
        dropping what still comes for a moment (nginx's lingering close), since closing a
        socket with unread bytes resets it and the client could lose its answer."""
        edge_cycle = cast(EdgeCycle, cycle)
        edge_cycle.keep_alive = False
        edge_cycle.transport = Lingering(self.transport, self.close_lingering)  # type: ignore[assignment]
        self._dropping = True

    def close_lingering(self) -> None:
        """Close after the answer without a reset: send FIN once the answer is out, drop what
        the client still sends, and close when it closes, or after LINGER_SECONDS."""
        transport = self.transport
        if transport.is_closing():
            return
        self._disarm_head_timer()
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._head_timer = self.loop.call_later(LINGER_SECONDS, transport.close)

    def _refuse_head(self, err: errors.EdgeError) -> None:
        """Refuse the request whose head just arrived. Pipelined behind requests still being
        answered, it waits for their answers (nothing more is read meanwhile)."""
        self.headers = []  # refused: none of its fields is read as a trailer later
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            self._deferred = err
            self._dropping = True
            return
        self._refuse(err)

    def _too_large(self) -> errors.EdgeError:
        return HeadersTooLarge(
            f"The request headers are larger than {self.limits.max_header_bytes} bytes."
        )

    def _trailers_too_large(self) -> errors.EdgeError:
        return HeadersTooLarge(
            f"The request's trailer fields are over {self.limits.max_header_bytes} bytes or "
            f"{self.limits.max_headers} fields."
        )

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _check_head(self) -> None:
        """The connection's one timer. It fires at the current head's deadline; when no head
        is under way, at the keep-alive deadline of an idle connection, or a timeout's length
        later. One timer per connection, re-armed as it fires, rather than one per request."""
        self._head_timer = None
        if self.transport.is_closing():
            return
        started, timeout = self._head_started, self.limits.header_timeout
        now = self.loop.time()
        if self._dropping:  # nothing more is read: the request being answered decides
            self._head_timer = self.loop.call_at(now + timeout, self._check_head)
            return
        if not self._in_head:  # a request body is arriving
            self._check_body(now)
            return
        if started is not None and now - started >= timeout:
            if self._head_bytes or self._tail:
                self._refuse(RequestTimeout())
            else:
                self.transport.close()  # nothing was asked: nothing to answer
            return
        due = started + timeout if started is not None else now + timeout
        idle = self._idle_since
        if idle is not None and started is None and self._idle():
            if now - idle >= self.timeout_keep_alive:
                self.transport.close()  # kept alive long enough, unused
                return
            due = min(due, idle + self.timeout_keep_alive)
        self._head_timer = self.loop.call_at(due, self._check_head)

    def _check_body(self, now: float) -> None:
        """The body deadline: `body_timeout` seconds without a piece of the request body while
        edge is reading it. Time edge itself holds the body back (reading paused because the
        app has not taken what came, or a 100-continue not yet sent) does not count."""
        cycle = self.cycle
        timeout = self.limits.body_timeout
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            self._body_seen = now
        elif now - self._body_seen >= timeout:
            self._refuse(BODY_TIMEOUT)
            return
        self._head_timer = self.loop.call_at(self._body_seen + timeout, self._check_head)

    def _idle(self) -> bool:
        """No request is being answered and none waits in the pipeline."""
        cycle = self.cycle
        return (cycle is None or cycle.response_complete) and not self.pipeline

    def _refuse(self, err: errors.EdgeError) -> None:
        """Answer `err` in edge's JSON and close, unless a response has already started (then
        just close: its bytes must not be interleaved)."""
        self._refused = True
        self._disarm_head_timer()
        log.debug("refused a connection: %s %s", err.status, err.code)
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            self.transport.close()
            return
        body = err.body()
        content = [STATUS_LINE[err.status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n",
                b"\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))
        self.transport.close()
