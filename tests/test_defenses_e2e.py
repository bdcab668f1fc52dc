"""Edge-of-network defenses through a real edge process (T23 in docs/testplan.md; bad input in
docs/guarantees.md).

Oversized or too many headers → 431 JSON before anything reaches Redis or the upstream, with
memory bounded (edge measures the head as it arrives; httptools alone would buffer a header of
any size); a head that does not finish within `server.header_timeout` → 408 (or just closed,
if nothing came); hundreds of slow-header connections do not hold up a real request; idle
keep-alive connections close after `server.keepalive_timeout`; `server.max_connections` caps
open connections with a 503 JSON.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.support.edge_process import EdgeProcess, auth, edge_env
from tests.support.fake_upstream import FakeUpstream
from tests.support.monitor import CommandCounter
from tests.support.procinfo import rss
from tests.support.raw_http import RawResponse, exchange, parse_response, request_head
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.slow
MakeKey = Callable[..., tuple[str, object]]
HEADER_TIMEOUT = 1.0


@pytest.fixture
def guarded(
    spawn_edge: Callable[..., EdgeProcess], redis_server: RedisServer, upstream: FakeUpstream
) -> EdgeProcess:
    """edge with short deadlines, so slow clients are cut within the test's time."""
    env = edge_env(
        redis_server.url,
        upstream.url,
        EDGE_SERVER_HEADER_TIMEOUT=str(HEADER_TIMEOUT),
        EDGE_SERVER_KEEPALIVE_TIMEOUT="1",
    )
    return spawn_edge(env, name="guarded")


def read_response(sock: socket.socket) -> RawResponse:
    """One whole response with a Content-Length body, leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    answer = parse_response(data)
    length = int(answer.header("content-length") or 0)
    while len(answer.body) < length:
        data += sock.recv(65536)
        answer = parse_response(data)
    return answer


def assert_json_error(data: bytes, status: int, code: str) -> None:
    answer = parse_response(data)
    assert answer.status == status, data[:300]
    assert answer.header("content-type") == "application/json"
    assert answer.header("connection") == "close"
    assert json.loads(answer.body)["error"]["code"] == code


def test_oversized_and_too_many_headers_get_431_before_redis_or_upstream(
    edge: EdgeProcess, upstream: FakeUpstream, redis_server: RedisServer, make_key: MakeKey
) -> None:
    key, _ = make_key()
    huge = request_head(edge.port, key, "GET /v1/models HTTP/1.1", "X-Big: " + "a" * 1_000_000)
    many = request_head(
        edge.port, key, "GET /v1/models HTTP/1.1", *(f"X-H{i}: v" for i in range(10_000))
    )
    just_over = request_head(edge.port, key, "GET /v1/models HTTP/1.1", "X-Pad: " + "b" * 17_000)
    small_many = request_head(
        edge.port, key, "GET /v1/models HTTP/1.1", *(f"X-{i}: v" for i in range(150))
    )
    before = rss(edge.pid)
    with CommandCounter(redis_server.port) as redis_calls:
        for probe, code in (
            (huge, "request_header_fields_too_large"),
            (many, "request_header_fields_too_large"),
            (just_over, "request_header_fields_too_large"),
            (small_many, "request_header_fields_too_large"),
        ):
            data, closed = exchange(edge.port, probe, limit=5)
            assert_json_error(data, 431, code)
            assert closed
    assert redis_calls.commands == []
    assert upstream.records == []
    assert rss(edge.pid) - before < 5 * 1024 * 1024
    # a request just under the limits still works
    fits = request_head(
        edge.port, key, "GET /v1/models HTTP/1.1", "Connection: close",
        *(f"X-Pad-{i}: " + "c" * 4_000 for i in range(3)),  # 12 KB: under edge's 16 KiB
    )  # fmt: skip
    data, _ = exchange(edge.port, fits, limit=2)
    assert parse_response(data).status == 200
    assert len(upstream.records) == 1


def test_an_endless_header_stream_is_cut_off_early(edge: EdgeProcess) -> None:
    """64 MiB of header bytes would be offered; edge answers and closes long before."""
    sent = 0
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: edge\r\nX-Endless: ")
        chunk = b"z" * 65_536
        try:
            while sent < 64 * 1024 * 1024:
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        else:
            pytest.fail("edge read 64 MiB of one header")
    assert sent < 4 * 1024 * 1024


def test_slow_headers_get_408_and_an_idle_connection_is_closed(guarded: EdgeProcess) -> None:
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=5) as slow, \
            socket.create_connection(("127.0.0.1", guarded.port), timeout=5) as idle:  # fmt: skip
        slow.sendall(b"GET /v1/models HTTP/1.1\r\n")
        received = b""
        try:
            while True:  # a header line every 0.2 s: never done within the deadline
                time.sleep(0.2)
                slow.sendall(b"X-Drip: 1\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        slow.settimeout(2)
        try:
            while data := slow.recv(65536):
                received += data
        except (ConnectionResetError, TimeoutError):
            pass
        cut_after = time.monotonic() - start
        assert HEADER_TIMEOUT * 0.9 < cut_after < HEADER_TIMEOUT + 1.5
        assert_json_error(received, 408, "request_timeout")
        idle.settimeout(3)
        assert idle.recv(1024) == b""  # closed without an answer: nothing was asked
        assert time.monotonic() - start < HEADER_TIMEOUT + 2


@pytest.fixture
def slowloris(guarded: EdgeProcess) -> Iterator[list[socket.socket]]:
    """500 connections that each send a partial head, then a byte now and then."""
    socks: list[socket.socket] = []
    stop = threading.Event()
    for _ in range(500):
        s = socket.create_connection(("127.0.0.1", guarded.port), timeout=5)
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)

    def drip() -> None:
        while not stop.wait(0.25):
            for s in socks:
                with contextlib.suppress(OSError):
                    s.send(b"X: y\r\n")

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    yield socks
    stop.set()
    thread.join(5)
    for s in socks:
        s.close()


def test_slowloris_does_not_hold_up_real_requests(
    guarded: EdgeProcess, slowloris: list[socket.socket], make_key: MakeKey
) -> None:
    key, _ = make_key("team")
    with httpx.Client(timeout=5) as client:
        for _ in range(5):
            start = time.perf_counter()
            resp = client.get(f"{guarded.url}/v1/models", headers=auth(key))
            assert resp.status_code == 200
            assert time.perf_counter() - start < 1
    deadline = time.monotonic() + HEADER_TIMEOUT + 3
    open_ones = list(slowloris)
    while open_ones and time.monotonic() < deadline:
        still = []
        for s in open_ones:
            s.settimeout(0.05)
            try:
                while s.recv(65536):
                    pass
            except TimeoutError:
                still.append(s)  # nothing to read yet: still open
            except OSError:
                pass
        open_ones = still
    assert open_ones == [], f"{len(open_ones)} slow connections still open after the deadline"


def test_idle_keepalive_connections_do_not_block_and_close_after_the_timeout(
    guarded: EdgeProcess, make_key: MakeKey
) -> None:
    key, _ = make_key("team")
    head = request_head(guarded.port, key, "GET /v1/models HTTP/1.1")
    idle = []
    for _ in range(100):
        s = socket.create_connection(("127.0.0.1", guarded.port), timeout=5)
        s.sendall(head)
        assert read_response(s).status == 200
        idle.append(s)
    start = time.perf_counter()
    assert httpx.get(f"{guarded.url}/v1/models", headers=auth(key)).status_code == 200
    assert time.perf_counter() - start < 1
    time.sleep(1.5)  # keepalive_timeout is 1 s
    for s in idle:
        s.settimeout(2)
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(1024) == b""
        s.close()


def test_max_connections_answers_503_beyond_the_cap(
    spawn_edge: Callable[..., EdgeProcess], redis_server: RedisServer, upstream: FakeUpstream
) -> None:
    capped = spawn_edge(
        edge_env(redis_server.url, upstream.url, EDGE_SERVER_MAX_CONNECTIONS="5"), name="capped"
    )
    held = [socket.create_connection(("127.0.0.1", capped.port), timeout=5) for _ in range(5)]
    try:
        time.sleep(0.2)
        data, closed = exchange(capped.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert_json_error(data, 503, "service_unavailable")
        assert closed
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    assert httpx.get(f"{capped.url}/healthz").status_code == 200
