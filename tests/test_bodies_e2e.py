"""Request bodies through a real edge process: streamed up as they arrive, byte for byte, and
refused with 413 before the upstream completes a request over `server.max_body_bytes`."""

from __future__ import annotations

import hashlib
import os
import time

import httpx

from tests.support.edge_process import EdgeProcess, edge_env
from tests.support.fake_upstream import FakeUpstream
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

    # chunked, crossing the limit mid-stream: 413 or a closed connection, and the upstream
    # never gets a complete request
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
    if answer:
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    time.sleep(0.2)
    assert all(r.body_length <= 100_000 for r in upstream.records)
    assert not any(r.completed for r in upstream.records)
