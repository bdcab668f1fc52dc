"""Hop-by-hop headers, framing and the key swap, over raw sockets to a real edge process.

TESTPLAN T26 `test_hop_by_hop_framing_and_key_swap` (RFC 9110 §7.6.1 both ways, no credential
leakage upstream, no framing pass-through), with its two companions: the upstream's own
`x-ratelimit-*` headers are replaced by edge's, and request-smuggling probes (CL+TE, duplicate
Content-Length, obs-fold, bare-LF chunk size) are refused before anything reaches the upstream,
a request pipelined behind them included.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest

from edge.store import KeyRecord
from tests.support.edge_process import PROVIDER_KEY, EdgeProcess
from tests.support.fake_upstream import FakeUpstream

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


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]  # names lower-cased, in the order received
    body: bytes

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name]


def chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out, data = out + data[:size], data[size + 2 :]


def exchange(port: int, data: bytes, limit: float = 2.0) -> tuple[bytes, bool]:
    """Send `data` on a fresh connection; read until EOF or `limit` seconds.

    Returns what came back and whether the server closed the connection (FIN or RST).
    """
    deadline = time.monotonic() + limit
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as sock:
        sock.sendall(data)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return received, False
            except ConnectionResetError:
                return received, True
            if not chunk:
                return received, True
            received += chunk
    return received, False


def parse_response(data: bytes) -> RawResponse:
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    response = RawResponse(int(status_line.split()[1]), headers, rest)
    if "chunked" in ",".join(response.values("transfer-encoding")).lower():
        response.body = dechunk(rest)
    elif lengths := response.values("content-length"):
        response.body = rest[: int(lengths[0])]
    return response


def request_head(edge: EdgeProcess, key: str, start: str, *lines: str) -> bytes:
    head = [start, f"Host: 127.0.0.1:{edge.port}", f"Authorization: Bearer {key}", *lines]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")


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
    json = "Content-Type: application/json"
    if probe == "cl_and_te":
        return request_head(
            edge, key, post, json, "Content-Length: 5", "Transfer-Encoding: chunked"
        ) + chunked([b"{}"])
    if probe == "duplicate_cl":
        return request_head(edge, key, post, json, "Content-Length: 2", "Content-Length: 3") + (
            b"{}x"
        )
    if probe == "obs_fold":
        return request_head(edge, key, "GET /v1/models HTTP/1.1", "X-Note: a", " folded")
    if probe == "bare_lf_chunk":
        head = request_head(edge, key, post, json, "Transfer-Encoding: chunked")
        return head + b"2\n{}\r\n0\r\n\r\n"
    raise AssertionError(probe)


@pytest.mark.parametrize("probe", ["cl_and_te", "duplicate_cl", "obs_fold", "bare_lf_chunk"])
def test_hop_by_hop_framing_smuggling_probe_refused(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey, probe: str
) -> None:
    key, _ = make_key()  # a valid key: a probe that got through would reach the upstream
    valid = request_head(edge, key, "GET /v1/models HTTP/1.1")
    data, closed = exchange(edge.port, smuggling_probe(edge, key, probe) + valid)

    statuses = re.findall(rb"^HTTP/1\.[01] (\d{3})", data, re.MULTILINE)
    assert statuses in ([], [b"400"]), f"{probe}: {data!r}"
    assert closed, f"{probe}: connection still open after 2 s; got {data!r}"
    assert upstream.records == [], f"{probe} reached the upstream: {upstream.records}"
