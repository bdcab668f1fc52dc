"""How edge frames the answers it relays, byte for byte over real sockets.

A whole upstream answer leaves edge in one write (`EdgeCycle.answer`), framed by edge's own
code instead of uvicorn's `send`; these tests hold that path to what uvicorn's would write:
Content-Length kept, chunked when the upstream gave no length, no body for HEAD, 204 and 304,
`connection: close` when the client asked for it, one Date header, the rate-limit headers,
and a keep-alive connection that carries the next request.

The upstream here is a scripted raw socket server: each request names, in `x-raw`, the exact
bytes it answers with.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.edge_process import EdgeProcess, edge_env
from tests.support.procinfo import tree_rss
from tests.support.raw_http import dechunk, request_head
from tests.support.redis_server import RedisServer

ANSWERS = {
    "length": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello",
    "chunked": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n",
    "chunked-empty": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "no-content": b"HTTP/1.1 204 No Content\r\nX-Kept: 1\r\n\r\n",
    "not-modified": b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n',
    "head": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 42\r\n\r\n",
    "error": b"HTTP/1.1 418 I'm a teapot\r\nContent-Length: 2\r\n\r\n{}",
}


SLOW = {
    b"slow-length": [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", b"world"],
    b"slow-chunked": [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"5\r\nhello\r\n",
        b"5\r\nworld\r\n",
        b"0\r\n\r\n",
    ],
}
BIG_PIECE = bytes(range(256)) * 256  # 64 KiB
BIG_CHUNKS = 512  # 32 MiB


class RawUpstream:
    """Answers each request with ANSWERS[x-raw], keeping the connection alive."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = False
        self.big_sent = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                fields = dict(
                    line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line
                )
                fields = {k.lower(): v for k, v in fields.items()}
                length = int(fields.get(b"content-length", b"0"))
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                buffer = buffer[length:]
                if fields[b"x-raw"] == b"big":
                    self._stream_big(conn)
                elif fields[b"x-raw"] in SLOW:
                    for piece in SLOW[fields[b"x-raw"]]:
                        conn.sendall(piece)
                        time.sleep(0.05)  # each piece in its own read: a streamed answer
                else:
                    conn.sendall(ANSWERS[fields[b"x-raw"].decode()])

    def _stream_big(self, conn: socket.socket) -> None:
        """BIG_CHUNKS chunks of BIG_PIECE, counting what the socket has taken."""
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        frame = b"%x\r\n%s\r\n" % (len(BIG_PIECE), BIG_PIECE)
        for _ in range(BIG_CHUNKS):
            conn.sendall(frame)  # blocks while nobody downstream reads: backpressure
            self.big_sent += len(BIG_PIECE)
        conn.sendall(b"0\r\n\r\n")

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@pytest.fixture(scope="module")
def raw_upstream() -> Iterator[RawUpstream]:
    upstream = RawUpstream()
    yield upstream
    upstream.close()


@pytest.fixture(scope="module")
def relay(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, raw_upstream: RawUpstream
) -> Iterator[EdgeProcess]:
    proc = EdgeProcess(
        Path(tmp_path_factory.mktemp("framing")), edge_env(redis_server.url, raw_upstream.url)
    ).start()
    yield proc
    proc.stop()


class Reader:
    """Reads responses one at a time off one keep-alive connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def response(self, bodyless: bool = False) -> tuple[int, list[tuple[str, str]], bytes, bytes]:
        """(status, headers, body, raw framed body) of the next response."""
        while b"\r\n\r\n" not in self.buffer:
            assert self._fill(), "connection closed before a response head"
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = [(n.strip().lower(), v.strip()) for n, _, v in (x.partition(":") for x in lines)]
        names = dict(headers)
        if bodyless:
            return int(status_line.split()[1]), headers, b"", b""
        if names.get("transfer-encoding") == "chunked":
            while not (self.buffer.startswith(b"0\r\n\r\n") or b"\r\n0\r\n\r\n" in self.buffer):
                assert self._fill(), "connection closed mid-body"
            end = self.buffer.index(b"0\r\n\r\n") + 5
            if not self.buffer.startswith(b"0\r\n\r\n"):
                end = self.buffer.index(b"\r\n0\r\n\r\n") + 7
            raw, self.buffer = self.buffer[:end], self.buffer[end:]
            return int(status_line.split()[1]), headers, dechunk(raw), raw
        length = int(names.get("content-length", "0"))
        while len(self.buffer) < length:
            assert self._fill(), "connection closed mid-body"
        raw, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split()[1]), headers, raw, raw


def ask(sock: socket.socket, port: int, key: str, answer: str, method: str = "GET") -> None:
    sock.sendall(request_head(port, key, f"{method} /v1/raw HTTP/1.1", f"x-raw: {answer}"))


def test_whole_answers_are_framed_as_uvicorn_would_on_one_kept_alive_connection(
    relay: EdgeProcess, make_key
) -> None:  # type: ignore[no-untyped-def]
    key, _ = make_key("pro")
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        reader = Reader(sock)
        cases = [
            ("length", "GET", 200, b"hello", {"content-length": "5"}, {"transfer-encoding"}),
            ("chunked", "GET", 200, b"hello", {"transfer-encoding": "chunked"}, {"content-length"}),
            ("chunked-empty", "GET", 200, b"", {"transfer-encoding": "chunked"}, set()),
            ("error", "POST", 418, b"{}", {"content-length": "2"}, set()),
        ]
        for answer, method, status, body, present, absent in cases:
            ask(sock, relay.port, key, answer, method)
            got_status, headers, got_body, raw = reader.response()
            names = dict(headers)
            assert (got_status, got_body) == (status, body), answer
            for name, value in present.items():
                assert names.get(name) == value, (answer, headers)
            assert not absent & names.keys(), (answer, headers)
            assert [n for n, _ in headers].count("date") == 1
            assert "x-ratelimit-remaining-requests" in names and "ratelimit" in names
            assert "connection" not in names  # kept alive: the next case uses this connection
            if names.get("transfer-encoding") == "chunked":
                assert raw.endswith(b"0\r\n\r\n")


def test_streamed_answers_keep_their_framing_and_the_connection(
    relay: EdgeProcess, make_key
) -> None:  # type: ignore[no-untyped-def]
    """Answers that arrive in pieces are written piece by piece (start_stream, pipe_body):
    a Content-Length answer keeps its length, a chunked one stays chunked and ends with its
    final chunk, and the connection carries the next request."""
    key, _ = make_key("pro")
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        reader = Reader(sock)
        for _ in range(2):
            ask(sock, relay.port, key, "slow-length")
            status, headers, body, _ = reader.response()
            names = dict(headers)
            assert (status, body, names.get("content-length")) == (200, b"helloworld", "10")
            assert "transfer-encoding" not in names and "connection" not in names
            assert [n for n, _ in headers].count("date") == 1
            ask(sock, relay.port, key, "slow-chunked")
            status, headers, body, raw = reader.response()
            names = dict(headers)
            assert (status, body, names.get("transfer-encoding")) == (200, b"helloworld", "chunked")
            assert "content-length" not in names and raw.endswith(b"0\r\n\r\n")
            assert "x-ratelimit-remaining-requests" in names
        assert reader.buffer == b""


@pytest.mark.parametrize(
    ("answer", "method", "status", "kept"),
    [
        ("no-content", "DELETE", 204, ("x-kept", "1")),
        ("not-modified", "GET", 304, ("etag", '"v1"')),
        ("head", "HEAD", 200, ("content-length", "42")),
    ],
)
def test_bodyless_answers_carry_no_body_and_no_chunking(
    relay: EdgeProcess, make_key, answer: str, method: str, status: int, kept: tuple[str, str]
) -> None:  # type: ignore[no-untyped-def]
    key, _ = make_key("pro")
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        reader = Reader(sock)
        for _ in range(2):  # the second answer shows no stray body bytes followed the first
            ask(sock, relay.port, key, answer, method)
            got_status, headers, _, _ = reader.response(bodyless=True)
            names = dict(headers)
            assert got_status == status
            assert names.get(kept[0]) == kept[1]
            assert "transfer-encoding" not in names
        ask(sock, relay.port, key, "length")
        assert reader.response()[2] == b"hello"
        assert reader.buffer == b""


def test_a_client_asking_to_close_gets_connection_close_and_a_closed_socket(
    relay: EdgeProcess, make_key
) -> None:  # type: ignore[no-untyped-def]
    key, _ = make_key("pro")
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        lines = ("x-raw: length", "Connection: close")
        sock.sendall(request_head(relay.port, key, "GET /v1/raw HTTP/1.1", *lines))
        reader = Reader(sock)
        status, headers, body, _ = reader.response()
        assert (status, body, dict(headers).get("connection")) == (200, b"hello", "close")
        assert sock.recv(10) == b""  # closed by edge


def test_a_slow_reader_holds_back_the_upstream_and_gets_every_byte(
    relay: EdgeProcess, raw_upstream: RawUpstream, make_key
) -> None:  # type: ignore[no-untyped-def]
    """Streamed answers are written by the upstream connection's callback (Response.pipe):
    a client that stops reading must stop edge reading from the upstream (no unbounded
    buffering), and get all 32 MiB intact once it reads again."""
    key, _ = make_key("pro")
    assert relay.pid is not None
    rss_before = tree_rss(relay.pid)
    with socket.create_connection(("127.0.0.1", relay.port), timeout=20) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        raw_upstream.big_sent = 0
        ask(sock, relay.port, key, "big")
        time.sleep(1.5)  # not reading
        held = raw_upstream.big_sent
        assert held < 16 * 1024 * 1024, f"{held} bytes left the upstream for a stalled client"
        assert tree_rss(relay.pid) - rss_before < 20 * 1024 * 1024
        received = bytearray()
        while not received.endswith(b"\r\n0\r\n\r\n"):
            data = sock.recv(1 << 20)
            assert data, "closed before the end of the body"
            received += data
    head, _, framed = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head
    body = dechunk(framed)
    assert len(body) == len(BIG_PIECE) * BIG_CHUNKS
    expected = hashlib.sha256(BIG_PIECE * BIG_CHUNKS).hexdigest()
    assert hashlib.sha256(body).hexdigest() == expected
