"""A scriptable HTTP/1.1 upstream on raw sockets, for the misbehaviour aiohttp will not commit.

It listens on a free loopback port and serves each connection in its own thread, as a plain
HTTP/1.1 server would: it reads a request head (request line and headers up to the blank
line), then the body by its Content-Length, and keeps the connection alive for the next
request. So when a proxy sends fewer body bytes than its Content-Length said, the next bytes
on that connection (another client's request, say) are read as the rest of that body, exactly
as a real server would read them.

Everything is recorded: every connection (an id, every raw byte received on it, when the
peer closed it) and every request (its connection and its place on it, method, target,
headers, body as far as it arrived). How each request is answered is chosen by its path
(`route(path, behaviour)`; anything else gets `Echo`):

  Echo()      read the body, answer 200 JSON naming the connection, the request's place on
              it, its path and whether it carried an Authorization header
  Early(...)  answer a head as soon as the request head is in, the body `delay` seconds
              later, and only then read the request body (optionally reading it during the
              delay too: `drain`)
  Raw(...)    read the body, then send the given bytes (or pieces, counting what the socket
              took before it failed), then keep the connection or close it

Bodies are read by Content-Length only (edge always sends one; a request without one has no
body). The server never answers anything by itself beyond what a behaviour says.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tests.support.waiting import wait_until

MAX_HEAD = 1024 * 1024  # a request head larger than this closes the connection
POLL = 0.05  # how often a blocked read looks at the stop flag
SEND_TIMEOUT = 10.0  # a send that cannot progress this long gives up


@dataclass
class Echo:
    """A normal answer: 200 JSON echoing what arrived, after the whole body."""


@dataclass
class Early:
    """Answer before reading the body: the head at once, the body `delay` s later, then the
    request body is read. With `drain`, body bytes are also read while the answer waits."""

    delay: float = 0.3
    status: int = 200
    chunked: bool = False
    drain: bool = False


@dataclass
class Raw:
    """After the whole request body, send `data`: bytes, or a factory of pieces sent one by one
    (each counted in `Request.sent` once the socket took it). `sndbuf` shrinks the send
    buffer first, so a peer that stops reading stops the sender soon. `close` closes the
    connection afterwards; else the next request is read from it."""

    data: bytes | Callable[[], Iterable[bytes]]
    close: bool = False
    sndbuf: int | None = None


Behaviour = Echo | Early | Raw


@dataclass
class Connection:
    id: int
    opened_at: float
    raw: bytearray = field(default_factory=bytearray)  # every byte received, in order
    closed_at: float | None = None  # when it ended (either side)
    closed_by_peer: bool = False  # the peer closed or reset it (EOF or ECONNRESET on a read)
    requests: int = 0  # heads read on it so far


@dataclass
class Request:
    conn: int  # the connection's id
    seq: int  # its place on the connection: 0 for the first request
    method: str
    target: str
    headers: list[tuple[str, str]]  # names lower-cased, in order
    head: bytes  # the request line and headers as received, without the blank line
    length: int  # the Content-Length it announced (0: none)
    received_at: float
    body: bytearray = field(default_factory=bytearray)  # as far as it arrived
    body_complete: bool = False
    head_sent_at: float | None = None  # when the answer's head (or first piece) left
    sent: int = 0  # bytes of a Raw answer the socket took
    send_error: str | None = None  # why sending a Raw answer failed, if it did
    done: threading.Event = field(default_factory=threading.Event)  # its handling ended

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def header(self, name: str) -> str | None:
        found = [v for n, v in self.headers if n == name.lower()]
        return found[0] if found else None


class _Closed(Exception):
    """The connection ended (peer or stop)."""


class RawUpstream:
    def __init__(self) -> None:
        self.records: list[Request] = []
        self.connections: dict[int, Connection] = {}
        self._routes: dict[str, Behaviour] = {}
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._next_id = 1
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI base URL edge is pointed at: requests arrive as /v1/<rest>."""
        return f"{self.base}/v1"

    def route(self, path: str, behaviour: Behaviour) -> None:
        """Answer requests for `path` (exact, query ignored) with `behaviour`."""
        self._routes[path] = behaviour

    def start(self) -> RawUpstream:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        listener.settimeout(POLL)
        self.port = listener.getsockname()[1]
        self._listener = listener
        thread = threading.Thread(target=self._accept, name="raw-upstream", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # unblocks a thread stuck in send
        for thread in self._threads[:1]:  # the acceptor first: no thread is added after it
            thread.join(5)
        for thread in self._threads[1:]:
            thread.join(5)

    def clear(self) -> None:
        self.records.clear()
        self.connections.clear()

    def wait_for(self, predicate: Callable[[], object], timeout: float = 5.0) -> bool:
        return wait_until(predicate, timeout, every=0.01)

    def on(self, conn: int) -> list[Request]:
        """The requests read on connection `conn`, in order."""
        return [r for r in self.records if r.conn == conn]

    # The server.

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                conn = Connection(self._next_id, time.monotonic())
                self._next_id += 1
                self.connections[conn.id] = conn
                self._socks.append(sock)
            thread = threading.Thread(
                target=self._serve, args=(sock, conn), name=f"raw-conn-{conn.id}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket, conn: Connection) -> None:
        sock.settimeout(POLL)
        reader = _Reader(sock, conn, self._stopping)
        rec: Request | None = None
        try:
            while True:
                rec = self._read_head(reader, conn)
                self.records.append(rec)
                behaviour = self._routes.get(rec.path, Echo())
                keep = self._answer(sock, reader, rec, behaviour)
                rec.done.set()
                if not keep or (rec.header("connection") or "").lower() == "close":
                    break
        except (_Closed, OSError, ValueError):  # the peer left or reset, the server stops,
            pass  # or the request was not HTTP (a Content-Length that is not a number)
        finally:
            if rec is not None:
                rec.done.set()
            if conn.closed_at is None:
                conn.closed_at = time.monotonic()
            with contextlib.suppress(OSError):
                sock.close()

    def _read_head(self, reader: _Reader, conn: Connection) -> Request:
        head = reader.until(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, *_ = [*lines[0].split(" "), "", ""]
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
        length = next((int(v) for n, v in headers if n == "content-length"), 0)
        rec = Request(
            conn.id, conn.requests, method, target, headers, head, length, time.monotonic()
        )
        conn.requests += 1
        return rec

    def _read_body(self, reader: _Reader, rec: Request, until: float | None = None) -> None:
        """Read the rest of `rec`'s body (up to its Content-Length); with `until`, only what
        arrives before that time."""
        while len(rec.body) < rec.length:
            piece = reader.some(rec.length - len(rec.body), until)
            if not piece:
                return  # the deadline passed
            rec.body += piece
        rec.body_complete = True

    def _answer(
        self, sock: socket.socket, reader: _Reader, rec: Request, behaviour: Behaviour
    ) -> bool:
        """Answer `rec` as `behaviour` says; whether the connection stays open."""
        if isinstance(behaviour, Early):
            body = self._echo_body(rec)
            head = b"HTTP/1.1 %d Early\r\nContent-Type: application/json\r\n" % behaviour.status
            head += (
                b"Transfer-Encoding: chunked\r\n\r\n"
                if behaviour.chunked
                else b"Content-Length: %d\r\n\r\n" % len(body)
            )
            self._send(sock, rec, head)
            end = time.monotonic() + behaviour.delay
            if behaviour.drain:
                self._read_body(reader, rec, until=end)
            if self._stopping.wait(max(0.0, end - time.monotonic())):
                raise _Closed
            self._send(
                sock,
                rec,
                b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if behaviour.chunked else body,
            )
            self._read_body(reader, rec)
            return True
        self._read_body(reader, rec)
        if isinstance(behaviour, Raw):
            if behaviour.sndbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, behaviour.sndbuf)
            pieces = [behaviour.data] if isinstance(behaviour.data, bytes) else behaviour.data()
            try:
                for piece in pieces:
                    self._send(sock, rec, piece)
                    rec.sent += len(piece)
            except OSError as exc:
                rec.send_error = f"{type(exc).__name__}: {exc}"
                return False
            return not behaviour.close
        body = self._echo_body(rec)
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        head += b"Content-Length: %d\r\n\r\n" % len(body)
        self._send(sock, rec, head + (b"" if rec.method == "HEAD" else body))
        return True

    def _send(self, sock: socket.socket, rec: Request, data: bytes) -> None:
        sock.settimeout(SEND_TIMEOUT)
        try:
            sock.sendall(data)
        finally:
            sock.settimeout(POLL)
        if rec.head_sent_at is None:
            rec.head_sent_at = time.monotonic()

    @staticmethod
    def _echo_body(rec: Request) -> bytes:
        return json.dumps(
            {
                "conn": rec.conn,
                "seq": rec.seq,
                "method": rec.method,
                "path": rec.path,
                "authorization": rec.header("authorization") is not None,
                "body_length": len(rec.body),
            }
        ).encode()


class _Reader:
    """Buffered reads off one connection, every byte also appended to `conn.raw`."""

    def __init__(self, sock: socket.socket, conn: Connection, stopping: threading.Event) -> None:
        self.sock = sock
        self.conn = conn
        self.stopping = stopping
        self.buffer = b""

    def _fill(self, until: float | None = None) -> bool:
        """Read once more; False if `until` passed first. Raises _Closed at EOF or stop."""
        while not self.stopping.is_set():
            if until is not None and time.monotonic() >= until:
                return False
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if not data:
                self.conn.closed_at = time.monotonic()
                self.conn.closed_by_peer = True
                raise _Closed
            self.conn.raw += data
            self.buffer += data
            return True
        raise _Closed

    def until(self, marker: bytes) -> bytes:
        """The bytes before `marker` (consumed with it)."""
        while marker not in self.buffer:
            if len(self.buffer) > MAX_HEAD:
                raise _Closed
            self._fill()
        found, _, self.buffer = self.buffer.partition(marker)
        return found

    def some(self, most: int, until: float | None = None) -> bytes:
        """Up to `most` bytes, at least one (b"" if `until` passed first)."""
        if not self.buffer and not self._fill(until):
            return b""
        piece, self.buffer = self.buffer[:most], self.buffer[most:]
        return piece
