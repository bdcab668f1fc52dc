"""Responses relayed through a real edge process, byte for byte and as they arrive.

T18 (docs/testplan.md) `test_sse_passthrough_unbuffered_and_byte_exact`: SSE events reach the client
when the upstream sends them (no buffering) and unchanged (sha256 of the client's bytes equals
the fake upstream's record), gzip bodies pass through still compressed, edge asks the upstream
for no compression the client did not ask for, and plain responses and upstream errors keep
their status, headers and body.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable

import httpx

from edge.control.records import KeyRecord
from tests.support.edge_process import EdgeProcess, auth
from tests.support.fake_upstream import FakeUpstream
from tests.support.metrics import inflight_settles

MakeKey = Callable[..., tuple[str, KeyRecord]]

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
EVENTS, GAP_MS = 10, 200


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_sse_passthrough_unbuffered_and_byte_exact(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key()
    knobs = auth(key, **{"x-fake-chunks": str(EVENTS), "x-fake-gap-ms": str(GAP_MS)})
    received = bytearray()
    buffer = b""
    arrivals: list[float] = []  # seconds after the request was sent, one per complete event
    with httpx.Client(timeout=10) as client:
        sent = time.monotonic()
        with client.stream(
            "POST", f"{edge.url}/v1/chat/completions", headers=knobs, json=CHAT
        ) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            for chunk in resp.iter_raw():
                now = time.monotonic() - sent
                received += chunk
                buffer += chunk
                # TCP may coalesce events or split one: count only complete events.
                *events, buffer = buffer.split(b"\n\n")
                arrivals += [now] * len(events)

    assert buffer == b""
    assert len(arrivals) == EVENTS + 1  # ten events and `data: [DONE]`
    assert received.endswith(b"data: [DONE]\n\n")
    assert arrivals[0] < 0.3, f"first event after {arrivals[0]:.3f} s: buffered?"
    gaps = [b - a for a, b in itertools.pairwise(arrivals[:EVENTS])]  # [DONE] follows at once
    assert all(0.1 <= gap <= 0.3 for gap in gaps), f"inter-arrival gaps {gaps}"

    [record] = upstream.records
    assert record.completed
    assert sha256(bytes(received)) == record.sent_sha256
    assert len(received) == record.sent_bytes
    assert inflight_settles(edge.url)


def test_gzip_body_passes_through_compressed(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key()
    headers = auth(key, **{"x-fake-gzip": "1", "Accept-Encoding": "gzip"})
    with (
        httpx.Client(timeout=10) as client,
        client.stream("GET", f"{edge.url}/v1/anything", headers=headers) as resp,
    ):
        body = b"".join(resp.iter_raw())  # raw: httpx does not decode

    assert resp.status_code == 200
    assert resp.headers["content-encoding"] == "gzip"
    assert body[:2] == b"\x1f\x8b"
    [record] = upstream.records
    assert record.header("accept-encoding") == "gzip"
    assert sha256(body) == record.sent_sha256
    assert resp.headers["content-length"] == str(record.sent_bytes)


def test_no_client_accept_encoding_means_no_gzip_upstream(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    """edge adds no Accept-Encoding of its own: an upstream that compresses whenever it may
    sends this client (which accepts no encoding) plain bytes."""
    key, _ = make_key()
    headers = auth(key, **{"x-fake-gzip": "accepted"})
    with httpx.Client(timeout=10) as client:
        request = client.build_request("GET", f"{edge.url}/v1/models", headers=headers)
        del request.headers["accept-encoding"]  # httpx adds one by default
        resp = client.send(request)
        resp.read()
        resp.close()
        asked = client.get(f"{edge.url}/v1/models", headers={**headers, "Accept-Encoding": "gzip"})

    assert resp.status_code == 200
    assert "content-encoding" not in resp.headers
    assert resp.json()["object"] == "list"  # plain JSON, not gzip bytes
    first, second = upstream.records
    assert first.headers("accept-encoding") in ([], ["identity"])
    # the same knob does compress when the client asks: the check above can fail
    assert second.header("accept-encoding") == "gzip"
    assert asked.headers["content-encoding"] == "gzip"


def test_plain_response_keeps_status_type_and_length(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key()
    with httpx.Client(timeout=10) as client:
        direct = client.get(f"{upstream.url}/models")  # what the upstream itself answers
        upstream.clear()
        resp = client.get(f"{edge.url}/v1/models", headers=auth(key))

    assert resp.status_code == direct.status_code == 200
    assert resp.headers["content-type"] == direct.headers["content-type"]
    assert resp.headers["content-length"] == direct.headers["content-length"]
    assert resp.content == direct.content
    [record] = upstream.records
    assert sha256(resp.content) == record.sent_sha256
    assert int(resp.headers["content-length"]) == record.sent_bytes


def test_upstream_error_relayed_byte_for_byte(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key()
    headers = auth(key, **{"x-fake-status": "500"})
    with httpx.Client(timeout=10) as client:
        resp = client.post(f"{edge.url}/v1/chat/completions", headers=headers, json=CHAT)

    assert resp.status_code == 500
    assert resp.headers["content-type"].startswith("application/json")
    [record] = upstream.records
    assert sha256(resp.content) == record.sent_sha256
    assert resp.json()["error"]["type"] == "fake_error"  # the upstream's, not edge's
    assert resp.headers["x-ratelimit-limit-requests"] == "20"
    assert inflight_settles(edge.url)
