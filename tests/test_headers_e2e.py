"""Hop-by-hop headers, framing and the key swap, over raw sockets to a real edge process.

T26 (docs/testplan.md) `test_hop_by_hop_framing_and_key_swap` (RFC 9110 §7.6.1 both ways, no
credential leakage upstream, no framing pass-through), with its two companions: the upstream's own
`x-ratelimit-*` headers are replaced by edge's, and request-smuggling probes (CL+TE, duplicate
Content-Length, obs-fold, bare-LF chunk size) are refused before anything reaches the upstream, a
request pipelined behind them included."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import httpx
import pytest

from edge.control.records import KeyRecord
from tests.support.edge_process import PROVIDER_KEY, EdgeProcess
from tests.support.fake_upstream import FakeUpstream
from tests.support.raw_http import chunked, exchange, parse_response, request_head

MakeKey = Callable[..., tuple[str, KeyRecord]]

BODY_PIECES = [b'{"model": "m", ', b'"messages": [{"role": "user", ', b'"content": "hi"}]}']
CLIENT_HOP_BY_HOP = [
    "x-secret",
    "keep-alive",
    "te",
    "upgrade",
    "proxy-authorization",
    "proxy-connection",
]


def test_hop_by_hop_framing_and_key_swap(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key()
    head = request_head(
        edge,
        key,
        "POST /v1/chat/completions HTTP/1.1",
        "Content-Type: application/json",
        "Connection: close, X-Secret",
        "X-Secret: 1",
        "Keep-Alive: 5",
        "TE: trailers",
        "Upgrade: h2c",
        "Proxy-Authorization: Basic x",
        "Proxy-Connection: keep-alive",
        "x-fake-header: Connection: X-Up",
        "x-fake-header: X-Up: 1",
        "Transfer-Encoding: chunked",
    )
    data, closed = exchange(edge.port, head + chunked(BODY_PIECES))

    response = parse_response(data)
    assert response.status == 200, data
    assert closed  # the client asked for `Connection: close`
    assert response.values("x-up") == []
    for value in response.values("connection"):
        assert "x-up" not in value.lower(), response.headers

    [record] = upstream.records
    names = record.header_names()
    for name in CLIENT_HOP_BY_HOP:
        assert name not in names, f"{name} reached the upstream: {record.raw_headers}"
    for value in record.headers("connection"):  # aiohttp may say its own keep-alive
        assert not {"close", "x-secret"} & {t.strip().lower() for t in value.split(",")}
    assert record.headers("authorization") == [f"Bearer {PROVIDER_KEY}"]
    raw = b"\r\n".join(n + b": " + v for n, v in record.raw_headers).decode("latin-1")
    for seen in (raw, record.path, record.query):
        assert key not in seen
        assert "gw_sk_" not in seen
    assert record.body == b"".join(BODY_PIECES)
    assert record.body_length == len(b"".join(BODY_PIECES))


def test_upstream_ratelimit_headers_replaced_by_edges(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key()  # plan free: 20 requests per minute
    headers = {
        "Authorization": f"Bearer {key}",
        "x-fake-header": "x-ratelimit-limit-requests: 99999",
    }
    with httpx.Client(timeout=10) as client:
        resp = client.get(f"{edge.url}/v1/models", headers=headers)

    assert resp.status_code == 200
    assert resp.headers.get_list("x-ratelimit-limit-requests") == ["20"]
    [record] = upstream.records
    assert record.headers("x-fake-header") == ["x-ratelimit-limit-requests: 99999"]


def smuggling_probe(edge: EdgeProcess, key: str, probe: str) -> bytes:
    post = "POST /v1/chat/completions HTTP/1.1"
    ctype = "Content-Type: application/json"
    if probe == "cl_and_te":
        return request_head(
            edge.port, key, post, ctype, "Content-Length: 5", "Transfer-Encoding: chunked"
        ) + chunked([b"{}"])
    if probe == "duplicate_cl":
        return request_head(
            edge.port, key, post, ctype, "Content-Length: 2", "Content-Length: 3"
        ) + (b"{}x")
    if probe == "obs_fold":
        return request_head(edge.port, key, "GET /v1/models HTTP/1.1", "X-Note: a", " folded")
    if probe == "bare_lf_chunk":
        head = request_head(edge.port, key, post, ctype, "Transfer-Encoding: chunked")
        return head + b"2\n{}\r\n0\r\n\r\n"
    raise AssertionError(probe)


@pytest.mark.parametrize("probe", ["cl_and_te", "duplicate_cl", "obs_fold", "bare_lf_chunk"])
def test_hop_by_hop_framing_smuggling_probe_refused(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey, probe: str
) -> None:
    key, _ = make_key()  # a valid key: a probe that got through would reach the upstream
    valid = request_head(edge.port, key, "GET /v1/models HTTP/1.1")
    data, closed = exchange(edge.port, smuggling_probe(edge, key, probe) + valid)

    statuses = re.findall(rb"^HTTP/1\.[01] (\d{3})", data, re.MULTILINE)
    assert statuses == [b"400"], f"{probe}: {data!r}"
    assert closed, f"{probe}: connection still open after 2 s; got {data!r}"
    assert upstream.records == [], f"{probe} reached the upstream: {upstream.records}"
    answer = parse_response(data)  # edge's JSON, not the server stack's text/plain
    assert answer.header("content-type") == "application/json"
    assert json.loads(answer.body)["error"]["code"] == "invalid_http_request"
