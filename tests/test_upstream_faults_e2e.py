"""Upstream faults and client disconnects through a real edge process (docs/guarantees.md; the
basics of T15, T16, T19, T20 in docs/testplan.md): always a JSON error or a visibly cut stream,
never a hang, and a client that leaves takes its upstream request with it."""

from __future__ import annotations

import hashlib
import socket
import time

import httpx
import pytest

from edge import errors
from tests.support.edge_process import EdgeProcess, auth, edge_env
from tests.support.fake_upstream import FakeUpstream
from tests.support.metrics import inflight_settles, scrape, value
from tests.support.ports import free_port
from tests.support.raw_http import (
    close,
    complete_chunked,
    exchange,
    open_request,
    parse_response,
    request_head,
)
from tests.support.redis_server import RedisServer


def test_upstream_refused_is_a_fast_502(spawn_edge, redis_server: RedisServer, make_key) -> None:
    closed = free_port()
    proc = spawn_edge(edge_env(redis_server.url, f"http://127.0.0.1:{closed}/v1"))
    key, _ = make_key()
    start = time.perf_counter()
    resp = httpx.get(f"{proc.url}/v1/models", headers=auth(key), timeout=10)
    assert time.perf_counter() - start < 1
    assert resp.status_code == 502
    assert resp.json()["error"]["type"] == "upstream_error"
    assert resp.headers["x-ratelimit-limit-requests"] == "20"  # admitted, so it was charged
    samples = scrape(proc.url)
    assert value(samples, "edge_requests_total", plan="free", outcome="upstream_error") == 1


def test_upstream_header_timeout_is_a_504(
    spawn_edge, redis_server: RedisServer, upstream: FakeUpstream, make_key
) -> None:
    proc = spawn_edge(edge_env(redis_server.url, upstream.url, EDGE_UPSTREAM_READ_TIMEOUT="0.5"))
    key, _ = make_key()
    start = time.perf_counter()
    resp = httpx.get(
        f"{proc.url}/v1/models",
        headers={**auth(key), "x-fake-header-delay-ms": "3000"},
        timeout=10,
    )
    assert time.perf_counter() - start < 1.5
    assert resp.status_code == 504
    assert resp.json()["error"] == {
        "message": errors.UpstreamTimeout.message,
        "type": "upstream_error",
        "param": None,
        "code": "upstream_timeout",
    }
    # edge gave up on the upstream request: the fake sees its client go
    assert upstream.wait_for(lambda: upstream.records[0].client_gone is not None, 3)


def test_stream_cut_midway_never_hangs(edge: EdgeProcess, upstream: FakeUpstream, make_key) -> None:
    """T16: an upstream reset mid-stream ends the client's stream at once, visibly incomplete."""
    key, _ = make_key()
    log_before = len(edge.log())
    cuts_before = value(
        scrape(edge.url), "edge_requests_total", plan="free", outcome="upstream_cut"
    )
    events = 0
    start = time.perf_counter()
    with (
        httpx.Client(timeout=5) as client,
        pytest.raises(httpx.RemoteProtocolError),
        client.stream(
            "GET",
            f"{edge.url}/v1/models",
            headers={
                **auth(key),
                "x-fake-chunks": "10",
                "x-fake-gap-ms": "50",
                "x-fake-reset-after": "3",
            },
        ) as resp,
    ):
        assert resp.status_code == 200
        for chunk in resp.iter_raw():
            events += chunk.count(b"\n\n")
    assert events == 3
    assert time.perf_counter() - start < 1
    new_log = edge.log()[log_before:]
    assert new_log.count("cut mid-way") == 1, new_log
    assert "Traceback" not in new_log
    assert "ASGI callable" not in new_log
    assert inflight_settles(edge.url)
    cuts = value(scrape(edge.url), "edge_requests_total", plan="free", outcome="upstream_cut")
    assert cuts == cuts_before + 1


def _request(port: int, key: str, extra: str) -> socket.socket:
    head = f"GET /v1/models HTTP/1.1\r\nHost: edge\r\nAuthorization: Bearer {key}\r\n{extra}\r\n"
    return open_request(port, head.encode())


@pytest.mark.parametrize("rst", [False, True], ids=["fin", "rst"])
def test_client_disconnect_mid_stream_cancels_upstream(
    edge: EdgeProcess, upstream: FakeUpstream, make_key, rst: bool
) -> None:
    """T19 (basics): the client leaves after 2 events → the upstream request is closed < 1 s."""
    key, _ = make_key("pro")
    for _ in range(3):
        upstream.clear()
        sock = _request(edge.port, key, "x-fake-chunks: 50\r\nx-fake-gap-ms: 100\r\n")
        received = b""
        while received.count(b"data: ") < 2:
            received += sock.recv(65536)
        close(sock, rst)
        gone_at = time.monotonic()
        assert upstream.wait_for(lambda: upstream.records[0].client_gone is not None, 2)
        assert upstream.records[0].client_gone - gone_at < 1  # type: ignore[operator]
        assert not upstream.records[0].completed
    assert inflight_settles(edge.url)
    start = time.perf_counter()
    assert httpx.get(f"{edge.url}/v1/models", headers=auth(key)).status_code == 200
    assert time.perf_counter() - start < 1


def test_client_disconnect_before_first_upstream_byte(
    edge: EdgeProcess, upstream: FakeUpstream, make_key
) -> None:
    """T20 (basics): leaving while the upstream has not answered yet also closes it."""
    key, _ = make_key()
    sock = _request(edge.port, key, "x-fake-header-delay-ms: 5000\r\n")
    assert upstream.wait_for(lambda: len(upstream.records) == 1, 2)
    time.sleep(0.5)
    close(sock)
    gone_at = time.monotonic()
    assert upstream.wait_for(lambda: upstream.records[0].client_gone is not None, 2)
    assert upstream.records[0].client_gone - gone_at < 1  # type: ignore[operator]
    assert inflight_settles(edge.url)


@pytest.mark.parametrize("end", ["close", "reset"])
def test_unframed_body_cut_by_a_reset_is_not_passed_off_as_whole(
    edge: EdgeProcess, upstream: FakeUpstream, make_key, end: str
) -> None:
    """A body without length framing ends when the upstream's connection does. A clean close
    is a whole answer; a reset must end the client's response as an error (without its final
    chunk), as a cut chunked stream does, and count as upstream_cut."""
    key, _ = make_key()
    before = value(scrape(edge.url), "edge_requests_total", plan="free", outcome="upstream_cut")
    knobs = (f"x-fake-unframed: {end}", "x-fake-chunks: 4", "Connection: close")
    head = request_head(edge.port, key, "GET /v1/models HTTP/1.1", *knobs)
    data, closed = exchange(edge.port, head, limit=3)
    answer = parse_response(data)
    [record] = upstream.records
    assert answer.status == 200
    assert answer.header("transfer-encoding") == "chunked"
    assert answer.body.count(b"data: ") == 4
    assert hashlib.sha256(answer.body).hexdigest() == record.sent_sha256
    cuts = value(scrape(edge.url), "edge_requests_total", plan="free", outcome="upstream_cut")
    if end == "close":
        assert complete_chunked(answer.raw)
        assert cuts == before
    else:
        assert not complete_chunked(answer.raw), "a reset body was relayed as complete"
        assert closed
        assert cuts == before + 1
    assert inflight_settles(edge.url)


def test_a_post_is_never_sent_twice(edge: EdgeProcess, upstream: FakeUpstream, make_key) -> None:
    """T17: the upstream read a POST's body, then reset the connection without answering: the
    client gets a 502 and the upstream saw the request exactly once, also when the request
    went out on a reused keep-alive connection (edge re-sends only idempotent methods
    there, as RFC 9112 §9.3.1 allows; POST is not one)."""
    key, _ = make_key("pro")
    with httpx.Client(base_url=edge.url, headers=auth(key), timeout=10) as client:
        for attempt in range(3):  # the first request may open a connection, later ones reuse
            assert client.post("/v1/files", content=b"warm").status_code == 200
            marker = f"post-{attempt}"
            resp = client.post(
                "/v1/files",
                content=b"charge me once",
                headers={"x-fake-reset-after-body": "1", "x-marker": marker},
            )
            assert resp.status_code == 502
            assert resp.json()["error"]["type"] == "upstream_error"
            seen = [r for r in upstream.records if r.header("x-marker") == marker]
            assert len(seen) == 1, f"the POST reached the upstream {len(seen)} times"
            assert seen[0].body == b"charge me once"
