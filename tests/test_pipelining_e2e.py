"""Pipelined requests through a real edge process: several requests written at once on one
connection are answered in order, each whole, including behind a streamed answer; nothing
pipelined behind a refused head runs. (This path runs uvicorn's private `_start_asgi_task`
from edge's `on_response_complete`: tests/test_dependency_contracts.py pins what it relies
on.)"""

from __future__ import annotations

import json
from collections.abc import Callable

from edge.control.records import KeyRecord
from tests.support.edge_process import EdgeProcess
from tests.support.fake_upstream import FakeUpstream
from tests.support.raw_http import exchange, request_head, split_responses

MakeKey = Callable[..., tuple[str, KeyRecord]]


def get(edge: EdgeProcess, key: str, query: str, *lines: str) -> bytes:
    return request_head(edge.port, key, f"GET /v1/models?{query} HTTP/1.1", *lines)


def test_three_pipelined_requests_are_answered_in_order(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key("pro")
    body = b'{"model": "m", "input": "x"}'
    post = request_head(
        edge.port, key, "POST /v1/embeddings HTTP/1.1",
        "Content-Type: application/json", f"Content-Length: {len(body)}",
    ) + body  # fmt: skip
    last = get(edge, key, "n=3", "Connection: close")
    data, closed = exchange(edge.port, get(edge, key, "n=1") + post + last, limit=5)
    answers = split_responses(data)
    assert [a.status for a in answers] == [200, 200, 200], data[:500]
    assert json.loads(answers[1].body)["object"] == "list"  # the embeddings answer, second
    assert closed
    assert [(r.method, r.query) for r in upstream.records] == [
        ("GET", "n=1"),
        ("POST", ""),
        ("GET", "n=3"),
    ]


def test_a_request_pipelined_behind_a_stream_waits_for_it(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key("pro")
    stream = get(edge, key, "n=1", "x-fake-chunks: 5", "x-fake-gap-ms: 30")
    data, _ = exchange(edge.port, stream + get(edge, key, "n=2", "Connection: close"), limit=5)
    answers = split_responses(data)
    assert [a.status for a in answers] == [200, 200], data[:500]
    assert answers[0].header("content-type") == "text/event-stream"
    assert answers[0].body.count(b"data: ") == 6  # five events and [DONE], whole
    assert answers[1].header("content-type") == "application/json"


def test_nothing_behind_an_oversized_head_runs(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key("pro")
    big = get(edge, key, "n=1", *(f"X-Pad-{i}: " + "p" * 4_000 for i in range(5)))  # 20 KB
    data, closed = exchange(edge.port, big + get(edge, key, "n=2"), limit=3)
    answers = split_responses(data)
    assert [a.status for a in answers] == [431], data[:500]
    assert closed
    assert upstream.records == []
