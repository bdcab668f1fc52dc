"""SSE keep-alives (`server.sse_keepalive`) and the headers of every event stream, through real
edge processes, a paced upstream (tests/support/paced_upstream.py) and a real nginx.

The upstream sends its headers, stays silent 3 s, sends two events, is silent 1.5 s, sends an
event, then half of the next one, is silent 1.3 s *inside* that event, then the rest and
`data: [DONE]`. With a keep-alive of 1 s:

- on the raw wire, `: keepalive\\n\\n` appears during the two silences between events (the
  first while the upstream has not yet written its first event), never inside an event:
  without them the bytes are exactly the upstream's;
- the OpenAI SDK's streaming iterator yields every chunk intact and nothing else;
- nginx with `proxy_read_timeout 2s` and `proxy_buffering off` lets the stream through the 3 s
  silence, while the same nginx in front of an edge with keep-alives off (0) cuts it: proof
  that the silence is real and that the keep-alives are what saves the stream;
- every `text/event-stream` answer carries `x-accel-buffering: no` and `cache-control:
  no-cache`, the upstream's own values replaced.

The five slow streams run at once in one module fixture (about 6 s in all, not 30).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.support.edge_process import EdgeProcess, auth, edge_env
from tests.support.keys import new_key
from tests.support.paced_upstream import (
    CONTENTS,
    DONE,
    EVENTS,
    STREAM,
    PacedUpstream,
)
from tests.support.raw_http import dechunk, parse_response
from tests.support.redis_server import RedisServer
from tests.support.stream_nginx import StreamNginx

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

KEEPALIVE = b": keepalive\n\n"
FIRST, GAP, SPLIT = 3.0, 1.5, 1.3  # the upstream's silences (seconds)
PACED = {"x-paced-first": str(FIRST), "x-paced-gap": str(GAP), "x-paced-split": str(SPLIT)}
BODY = b'{"model": "paced-model", "messages": [{"role": "user", "content": "hi"}], "stream": true}'
AFTER_HEADERS = 0  # where the keep-alives of the first silence go, in the upstream's bytes
IN_GAP = len(EVENTS[0]) + len(EVENTS[1])  # ... and those of the silence between events 1 and 2
LIMIT = 20.0  # seconds any one stream may take in all


# Processes.


@dataclass
class Setup:
    upstream: PacedUpstream
    on: EdgeProcess  # server.sse_keepalive = 1
    off: EdgeProcess  # server.sse_keepalive = 0
    nginx_on: StreamNginx  # proxy_read_timeout 2s in front of `on`
    nginx_off: StreamNginx  # ... and of `off`
    keys: Callable[[], str]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Setup]:
    upstream = PacedUpstream().start()
    started: list[Any] = []
    try:
        logs = tmp_path_factory.mktemp("sse")
        on = EdgeProcess(
            logs, edge_env(redis_server.url, upstream.url, EDGE_SERVER_SSE_KEEPALIVE="1"), "ka-on"
        )
        started.append(on.start())
        off = EdgeProcess(
            logs, edge_env(redis_server.url, upstream.url, EDGE_SERVER_SSE_KEEPALIVE="0"), "ka-off"
        )
        started.append(off.start())
        nginx_on = StreamNginx(logs / "nginx-on", on.port, "2s")
        started.append(nginx_on.start())
        nginx_off = StreamNginx(logs / "nginx-off", off.port, "2s")
        started.append(nginx_off.start())
        yield Setup(
            upstream, on, off, nginx_on, nginx_off, lambda: new_key(redis_server.url, "pro")[0]
        )
    finally:
        for server in reversed(started):
            server.stop()
        upstream.stop()


# Reading streams.


@dataclass
class Wire:
    """One response as it arrived on a raw socket: the bytes, and when each piece came."""

    pieces: list[tuple[float, bytes]] = field(default_factory=list)
    sent_at: float = 0.0
    error: str | None = None

    @property
    def raw(self) -> bytes:
        return b"".join(data for _, data in self.pieces)

    def arrival(self, needle: bytes) -> float | None:
        """When the first occurrence of `needle` in the raw bytes had fully arrived."""
        at = self.raw.find(needle)
        if at < 0:
            return None
        end, offset = at + len(needle), 0
        for when, data in self.pieces:
            offset += len(data)
            if offset >= end:
                return when
        return None


def raw_stream(port: int, key: str, headers: dict[str, str]) -> Wire:
    """POST the chat stream on a fresh socket (`Connection: close`); read until EOF."""
    lines = [
        "POST /v1/chat/completions HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        f"Authorization: Bearer {key}",
        "Content-Type: application/json",
        f"Content-Length: {len(BODY)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    wire = Wire()
    deadline = time.monotonic() + LIMIT
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        wire.sent_at = time.monotonic()
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + BODY)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except (TimeoutError, ConnectionResetError) as exc:
                wire.error = repr(exc)
                break
            if not data:
                break
            wire.pieces.append((time.monotonic(), data))
    return wire


@dataclass
class Through:
    """A stream read with httpx (through nginx): the body's bytes, how it ended, how long."""

    status: int = 0
    body: bytes = b""
    error: str | None = None
    seconds: float = 0.0


def httpx_stream(url: str, key: str) -> Through:
    got = Through()
    started = time.monotonic()
    timeout = httpx.Timeout(LIMIT, connect=5)
    try:
        with httpx.stream(
            "POST",
            f"{url}/v1/chat/completions",
            headers=auth(key, **PACED, **{"Content-Type": "application/json"}),
            content=BODY,
            timeout=timeout,
        ) as resp:
            got.status = resp.status_code
            for piece in resp.iter_raw():
                got.body += piece
                if time.monotonic() - started > LIMIT:
                    break
    except httpx.HTTPError as exc:
        got.error = repr(exc)
    got.seconds = time.monotonic() - started
    return got


def sdk_stream(url: str, key: str) -> list[Any]:
    with (
        OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=LIMIT) as client,
        client.chat.completions.create(
            model="paced-model",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers=PACED,
        ) as stream,
    ):
        return list(stream)


def strip_keepalives(body: bytes) -> tuple[bytes, list[int]]:
    """`body` without its keep-alive comments, and where each one was (offsets in the rest)."""
    out = bytearray()
    points: list[int] = []
    i = 0
    while i < len(body):
        if body.startswith(KEEPALIVE, i):
            points.append(len(out))
            i += len(KEEPALIVE)
            continue
        j = body.find(KEEPALIVE, i)
        j = len(body) if j < 0 else j
        out += body[i:j]
        i = j
    return bytes(out), points


@pytest.fixture(scope="module")
def streams(setup: Setup) -> Iterator[dict[str, Future[Any]]]:
    """The five slow streams, started together; each test waits for its own."""
    with ThreadPoolExecutor(5) as pool:
        futures: dict[str, Future[Any]] = {
            "raw-on": pool.submit(raw_stream, setup.on.port, setup.keys(), tagged("raw-on")),
            "raw-off": pool.submit(raw_stream, setup.off.port, setup.keys(), tagged("raw-off")),
            "sdk": pool.submit(sdk_stream, setup.on.url, setup.keys()),
            "nginx-on": pool.submit(httpx_stream, setup.nginx_on.url, setup.keys()),
            "nginx-off": pool.submit(httpx_stream, setup.nginx_off.url, setup.keys()),
        }
        yield futures
        for future in futures.values():
            future.cancel()


def tagged(tag: str) -> dict[str, str]:
    return {**PACED, "x-paced-tag": tag}


def result(streams: dict[str, Future[Any]], name: str) -> Any:
    return streams[name].result(timeout=LIMIT + 10)


# Tests.


def test_keepalives_fill_the_silences_between_events_on_the_raw_wire(
    setup: Setup, streams: dict[str, Future[Any]]
) -> None:
    wire: Wire = result(streams, "raw-on")
    assert wire.error is None, wire.error
    resp = parse_response(wire.raw)
    assert resp.status == 200, wire.raw[:500]
    assert (resp.header("content-type") or "").startswith("text/event-stream")
    assert "chunked" in (resp.header("transfer-encoding") or "").lower()
    assert wire.raw.endswith(b"0\r\n\r\n"), wire.raw[-200:]  # the stream ended whole
    body = dechunk(wire.raw.partition(b"\r\n\r\n")[2])

    rest, points = strip_keepalives(body)
    assert rest == STREAM, body  # every event intact, in order, nothing else added
    # only between events: right after the headers, or after a blank line that ends an event
    for at in points:
        assert at == 0 or rest[:at].endswith(b"\n\n"), (at, body)
    assert set(points) <= {AFTER_HEADERS, IN_GAP}, (points, body)  # none in the 1.3 s split
    assert 2 <= points.count(AFTER_HEADERS) <= 3, points  # 3 s of silence, one every second
    assert 1 <= points.count(IN_GAP) <= 2, points  # 1.5 s of silence
    # the first one came while the upstream was still silent, not when it spoke again
    [paced] = [p for p in setup.upstream.streams if p.tag == "raw-on"]
    first_keepalive = wire.arrival(KEEPALIVE)
    assert first_keepalive is not None
    assert first_keepalive < paced.writes[0][0], "the keep-alive came after the first event"
    assert first_keepalive - wire.sent_at < FIRST - 0.5


def test_no_keepalives_when_the_setting_is_0(streams: dict[str, Future[Any]]) -> None:
    wire: Wire = result(streams, "raw-off")
    assert wire.error is None, wire.error
    resp = parse_response(wire.raw)
    assert resp.status == 200
    assert resp.body == STREAM  # the upstream's bytes, exactly: no comment at all


def test_the_openai_sdk_iterator_gets_every_chunk_and_nothing_else(
    streams: dict[str, Future[Any]],
) -> None:
    chunks = result(streams, "sdk")
    assert [type(c).__name__ for c in chunks] == ["ChatCompletionChunk"] * len(CONTENTS)
    assert [(c.choices[0].delta.content, c.choices[0].finish_reason) for c in chunks] == CONTENTS
    assert {c.id for c in chunks} == {"chatcmpl-paced"}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}


def test_nginx_with_a_2s_read_timeout_lets_a_kept_alive_stream_through(
    streams: dict[str, Future[Any]],
) -> None:
    got: Through = result(streams, "nginx-on")
    assert got.error is None, (got.error, got.body)
    assert got.status == 200
    rest, points = strip_keepalives(got.body)
    assert rest == STREAM
    assert points and set(points) <= {AFTER_HEADERS, IN_GAP}, points
    assert got.seconds >= FIRST + GAP + SPLIT - 0.3  # it really took the silences


def test_the_same_nginx_cuts_the_stream_without_keepalives(
    streams: dict[str, Future[Any]],
) -> None:
    got: Through = result(streams, "nginx-off")
    assert got.status == 200  # nginx had passed the headers on...
    assert DONE not in got.body and b"data:" not in got.body, got.body  # ... then cut it
    assert got.seconds < FIRST, got  # at its 2 s read timeout, before the first event


@pytest.mark.parametrize("which", ["on", "off"])
def test_every_event_stream_says_no_buffering_and_no_cache(setup: Setup, which: str) -> None:
    proc = setup.on if which == "on" else setup.off
    resp = httpx.post(
        f"{proc.url}/v1/chat/completions",
        headers=auth(setup.keys(), **{"Content-Type": "application/json"}),
        content=BODY,
        timeout=10,
    )
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.content == STREAM
    # the upstream said UPSTREAM_CACHE_CONTROL and UPSTREAM_ACCEL_BUFFERING: edge's replace them
    assert resp.headers.get_list("x-accel-buffering") == ["no"]
    assert resp.headers.get_list("cache-control") == ["no-cache"]
