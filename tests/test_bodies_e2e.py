"""Request bodies through a real edge process: streamed up as they arrive, byte for byte, and
refused with 413 before the upstream completes a request over `server.max_body_bytes`."""

from __future__ import annotations

import hashlib
import os
import time

import httpx
import pytest

from tests.support.edge_process import EdgeProcess, edge_env
from tests.support.fake_upstream import FakeUpstream
from tests.support.procinfo import rss
from tests.support.raw_http import send_in_pieces
from tests.support.redis_server import RedisServer


def test_chunked_upload_in_many_writes_is_streamed_byte_exact(
    edge: EdgeProcess, upstream: FakeUpstream, make_key
) -> None:
    key, _ = make_key()
    parts = [os.urandom(256 * 1024) for _ in range(12)]
    body = b"".join(parts)
    head = (
        "POST /v1/files HTTP/1.1\r\nHost: edge\r\nContent-Type: application/octet-stream\r\n"
        f"Authorization: Bearer {key}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    pieces = [b"%x\r\n%s\r\n" % (len(p), p) for p in parts] + [b"0\r\n\r\n"]
    answer = send_in_pieces(edge.port, head, pieces, 0.01)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    [rec] = upstream.records
    assert rec.body_length == len(body)
    assert rec.body_sha256 == hashlib.sha256(body).hexdigest()
    assert rec.header("content-type") == "application/octet-stream"


def test_content_length_upload_keeps_its_length(
    edge: EdgeProcess, upstream: FakeUpstream, make_key
) -> None:
    key, _ = make_key()
    body = os.urandom(2 * 1024 * 1024)
    head = (
        "POST /v1/files HTTP/1.1\r\nHost: edge\r\n"
        f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    pieces = [body[i : i + 128 * 1024] for i in range(0, len(body), 128 * 1024)]
    answer = send_in_pieces(edge.port, head, pieces, 0.005)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    [rec] = upstream.records
    assert rec.header("content-length") == str(len(body))
    assert rec.header("transfer-encoding") is None
    assert rec.body_sha256 == hashlib.sha256(body).hexdigest()


def test_body_over_the_limit_is_413_before_the_upstream(
    spawn_edge, redis_server: RedisServer, upstream: FakeUpstream, make_key
) -> None:
    proc = spawn_edge(edge_env(redis_server.url, upstream.url, EDGE_SERVER_MAX_BODY_BYTES="100000"))
    key, _ = make_key()
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=proc.url, headers=headers) as client:
        resp = client.post("/v1/files", content=b"x" * 100_001)
        assert resp.status_code == 413
        assert resp.json()["error"]["code"] == "request_too_large"
        assert upstream.records == []
        assert client.post("/v1/files", content=b"x" * 100_000).status_code == 200

    # chunked, crossing the limit mid-stream: spooled, so refused before the upstream sees a
    # byte, with the same 413
    upstream.clear()
    head = (
        "POST /v1/files HTTP/1.1\r\nHost: edge\r\n"
        f"Authorization: Bearer {key}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    piece = os.urandom(30_000)
    pieces = [b"%x\r\n%s\r\n" % (len(piece), piece)] * 5 + [b"0\r\n\r\n"]
    try:
        answer = send_in_pieces(proc.port, head, pieces, 0.02)
    except (BrokenPipeError, ConnectionResetError):
        answer = b""
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"request_too_large"' in answer
    time.sleep(0.2)
    assert upstream.records == []


@pytest.mark.slow
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_50_mb_body_goes_up_byte_exact_in_bounded_memory(
    spawn_edge, redis_server: RedisServer, upstream: FakeUpstream, make_key, framing: str
) -> None:
    """T24: 50 MB under a 64 MiB limit reaches the upstream byte for byte while edge's RSS
    grows < 20 MB: a Content-Length body is streamed; a chunked one is spooled to a temporary
    file (to know its size before the upstream sees a byte) and sent with its length."""
    proc = spawn_edge(
        edge_env(redis_server.url, upstream.url, EDGE_SERVER_MAX_BODY_BYTES=str(64 * 2**20))
    )
    key, _ = make_key()
    block = os.urandom(1024 * 1024)
    digest = hashlib.sha256()
    for _ in range(50):
        digest.update(block)
    framing_header = (
        f"Content-Length: {50 * len(block)}" if framing == "content-length"
        else "Transfer-Encoding: chunked"
    )  # fmt: skip
    head = (
        f"POST /v1/files HTTP/1.1\r\nHost: edge\r\nAuthorization: Bearer {key}\r\n"
        f"{framing_header}\r\n\r\n"
    ).encode()
    wrap = (lambda b: b"%x\r\n%s\r\n" % (len(b), b)) if framing == "chunked" else (lambda b: b)
    pieces = [wrap(block)] * 50 + ([b"0\r\n\r\n"] if framing == "chunked" else [])
    before = rss(proc.pid)
    peak = [before]
    answer = send_in_pieces(
        proc.port, head, pieces, 0.0, on_piece=lambda: peak.append(rss(proc.pid))
    )
    peak.append(rss(proc.pid))
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    [record] = upstream.records
    assert record.body_length == 50 * len(block)
    assert record.body_sha256 == digest.hexdigest()
    assert record.header("content-length") == str(50 * len(block))
    assert max(peak) - before < 20 * 1024 * 1024, (before, max(peak))
