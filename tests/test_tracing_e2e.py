"""Tracing (`tracing.otlp_endpoint`, EDGE_TRACING_OTLP_ENDPOINT): edge exports its spans by
OTLP/HTTP protobuf to `<endpoint>/v1/traces`, here an OTLP receiver started by the test
(tests/support/otlp_receiver.py) that decodes them with opentelemetry-proto.

A `/v1` request is one `edge.request` span (SERVER) with two children, `edge.admission` (the
Redis call) and `edge.upstream` (CLIENT, until the answer's head); a client's W3C
`traceparent` continues its trace, and the upstream request carries the `traceparent` of the
`edge.upstream` span. The attributes name the plan, the outcome, the status, the key's id and
the upstream, never the key. With the endpoint empty (the default) nothing is exported, even
with the OpenTelemetry SDK's own OTEL_EXPORTER_OTLP_* variables set, and no `traceparent` is
added to the upstream request.

The exporter batches (BatchSpanProcessor): spans are polled for, for up to 10 s.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator

import httpx
import pytest

from edge.control.records import KeyRecord
from tests.support.edge_process import PROVIDER_KEY, EdgeProcess, auth, edge_env
from tests.support.fake_upstream import FakeUpstream, Record
from tests.support.fleet import Fleet, clean_proxy_env
from tests.support.keys import new_key, secret_part
from tests.support.otlp_receiver import SPAN_KIND_CLIENT, SPAN_KIND_SERVER, OtlpReceiver, Span
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

TRACEPARENT = re.compile(
    r"^00-(?P<trace>[0-9a-f]{32})-(?P<span>[0-9a-f]{16})-(?P<flags>[0-9a-f]{2})$"
)
NAMES = {"edge.request", "edge.admission", "edge.upstream"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def trap() -> Iterator[OtlpReceiver]:
    """Where the SDK's own environment variables point the untraced edge: must get nothing."""
    server = OtlpReceiver().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    fake_upstream_server: FakeUpstream,
    receiver: OtlpReceiver,
    trap: OtlpReceiver,
) -> Iterator[Fleet]:
    url, upstream = redis_server.url, fake_upstream_server.url
    envs = {
        "traced": edge_env(url, upstream, EDGE_TRACING_OTLP_ENDPOINT=receiver.base),
        "untraced": edge_env(
            url,
            upstream,
            EDGE_TRACING_OTLP_ENDPOINT="",
            OTEL_EXPORTER_OTLP_ENDPOINT=trap.base,
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"{trap.base}/v1/traces",
            OTEL_BSP_SCHEDULE_DELAY="100",
        ),
    }
    with clean_proxy_env():
        fleet = Fleet(tmp_path_factory.mktemp("tracing")).start(envs)
        yield fleet
        fleet.stop()


@pytest.fixture(scope="module")
def key(redis_server: RedisServer) -> tuple[str, KeyRecord]:
    return new_key(redis_server.url, "free")


def traceparent() -> tuple[str, str, str]:
    """(header, trace id, parent span id) of a fresh, sampled client span."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def post_chat(proc: EdgeProcess, key: str, **headers: str) -> httpx.Response:
    with httpx.Client(base_url=proc.url, timeout=15, trust_env=False) as client:
        return client.post("/v1/chat/completions", headers=auth(key, **headers), json=CHAT)


def upstream_traceparent(record: Record) -> re.Match[str]:
    values = record.headers("traceparent")
    assert len(values) == 1, record.raw_headers
    found = TRACEPARENT.match(values[0])
    assert found, values
    return found


def one(spans: list[Span], name: str) -> Span:
    named = [s for s in spans if s.name == name]
    assert len(named) == 1, [(s.name, s.span_id) for s in spans]
    return named[0]


def within(child: Span, parent: Span) -> bool:
    return parent.start_ns <= child.start_ns <= child.end_ns <= parent.end_ns


def check_trace(spans: list[Span], trace_id: str, client_parent: str, kid: str) -> Span:
    """The three spans of one request, linked and attributed as the spec says; the
    `edge.upstream` span."""
    request = one(spans, "edge.request")
    admission = one(spans, "edge.admission")
    upstream = one(spans, "edge.upstream")
    assert {s.trace_id for s in (request, admission, upstream)} == {trace_id}
    assert request.kind == SPAN_KIND_SERVER
    assert upstream.kind == SPAN_KIND_CLIENT
    assert request.parent_span_id == client_parent  # "" when the client sent no traceparent
    assert admission.parent_span_id == request.span_id
    assert upstream.parent_span_id == request.span_id
    assert within(admission, request) and within(upstream, request)
    attrs = request.attributes
    assert attrs.get("edge.plan") == "free", attrs
    assert attrs.get("edge.key_id") == kid, attrs
    assert attrs.get("http.response.status_code") == 200, attrs
    assert isinstance(attrs.get("edge.outcome"), str) and attrs["edge.outcome"], attrs
    named = {attrs.get("edge.upstream"), upstream.attributes.get("edge.upstream")}
    assert "default" in named, (attrs, upstream.attributes)
    assert request.resource.get("service.name") == "edge", request.resource
    return upstream


def test_spans_continue_the_clients_trace_and_reach_the_upstream(
    fleet: Fleet,
    receiver: OtlpReceiver,
    upstream: FakeUpstream,
    key: tuple[str, KeyRecord],
) -> None:
    """With a client `traceparent`: its trace id on all three spans, `edge.request`'s parent
    the client's span, and the upstream got a `traceparent` naming the `edge.upstream` span.
    Without one: a new trace, `edge.request` its root, the same links. No key, plaintext or its
    secret part, and not the provider's either, anywhere in what was exported."""
    plaintext, record = key
    proc = fleet["traced"]
    header, trace_id, client_span = traceparent()
    continued = post_chat(proc, plaintext, traceparent=header)
    assert continued.status_code == 200, continued.text
    fresh = post_chat(proc, plaintext)
    assert fresh.status_code == 200, fresh.text
    assert [r.path for r in upstream.records] == ["/v1/chat/completions"] * 2

    sent = upstream_traceparent(upstream.records[0])
    assert sent.group("trace") == trace_id
    assert sent.group("span") != client_span
    new = upstream_traceparent(upstream.records[1])
    new_trace = new.group("trace")
    assert new_trace not in (trace_id, "0" * 32)

    for wanted in (trace_id, new_trace):
        assert receiver.wait_for_names(wanted, NAMES, 10), (
            f"spans of trace {wanted}: {[s.name for s in receiver.spans(wanted)]}; "
            f"received: {receiver.paths}\n{proc.log()[-3000:]}"
        )
    upstream_span = check_trace(receiver.spans(trace_id), trace_id, client_span, record.id)
    assert sent.group("span") == upstream_span.span_id
    fresh_upstream = check_trace(receiver.spans(new_trace), new_trace, "", record.id)
    assert new.group("span") == fresh_upstream.span_id

    assert set(receiver.paths) == {"POST /v1/traces"}
    exported = b"".join(receiver.bodies)
    for secret in (plaintext, secret_part(plaintext), PROVIDER_KEY):
        assert secret.encode() not in exported, f"{secret!r} was exported"
    assert plaintext not in proc.log()


def test_no_endpoint_exports_nothing_and_adds_no_traceparent(
    fleet: Fleet,
    receiver: OtlpReceiver,
    trap: OtlpReceiver,
    upstream: FakeUpstream,
    key: tuple[str, KeyRecord],
) -> None:
    """EDGE_TRACING_OTLP_ENDPOINT empty, OTEL_EXPORTER_OTLP_* pointing at a trap: the upstream
    gets no `traceparent` edge made (a client's goes through as sent, if at all), and after edge
    stopped (an SDK exporter would flush then) nothing reached either receiver."""
    proc = fleet["untraced"]
    plain = post_chat(proc, key[0])
    assert plain.status_code == 200, plain.text
    header, trace_id, _ = traceparent()
    continued = post_chat(proc, key[0], traceparent=header)
    assert continued.status_code == 200, continued.text
    first, second = upstream.records
    assert first.headers("traceparent") == [], first.raw_headers
    assert second.headers("traceparent") in ([], [header]), second.raw_headers

    assert proc.stop() == 0, proc.log()[-3000:]
    assert trap.paths == [], trap.paths
    assert receiver.spans(trace_id) == []
