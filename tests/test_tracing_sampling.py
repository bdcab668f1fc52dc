"""`tracing.sample_ratio` in process: unsampled requests make spans that record nothing, and a
client's sampled traceparent is followed whatever the ratio."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from edge.proxy.tracing import Tracing
from tests.support.otlp_sink import otlp_sink

SAMPLED = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UNSAMPLED = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


@pytest.fixture
def collector() -> Iterator[str]:
    url, server = otlp_sink()
    yield url
    server.shutdown()
    server.server_close()


def test_a_ratio_of_zero_records_only_what_the_client_sampled(collector: str) -> None:
    tracing = Tracing(collector, "edge", sample_ratio=0.0)
    try:
        alone = tracing.start([], "POST", "/v1/chat/completions")
        followed = tracing.start([(b"traceparent", SAMPLED)], "POST", "/v1/x")
        declined = tracing.start([(b"traceparent", UNSAMPLED)], "POST", "/v1/x")
        assert not alone.root.is_recording()
        assert followed.root.is_recording()
        assert followed.root.get_span_context().trace_id == int(SAMPLED[3:35], 16)
        assert not declined.root.is_recording()
        span, headers = followed.upstream("default")
        assert span.is_recording() and headers[0][0] == b"traceparent"
        assert headers[0][1].startswith(b"00-0af7651916cd43dd8448eb211c80319c-")
        for trace in (alone, followed, declined):
            trace.finish("kid", "pro", "allowed", 200)
        span.end()
    finally:
        tracing.provider.shutdown()


def test_a_ratio_of_one_records_every_request(collector: str) -> None:
    tracing = Tracing(collector, "edge", sample_ratio=1.0)
    try:
        trace = tracing.start([], "GET", "/v1/models")
        assert trace.root.is_recording()
        trace.finish(None, "none", "unauthorized", 401)
    finally:
        tracing.provider.shutdown()
