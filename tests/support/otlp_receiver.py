"""An OTLP/HTTP trace receiver for tests: an aiohttp server on a free loopback port, in a
background thread, that accepts `POST /v1/traces` (protobuf, gzip or not), decodes each body
with opentelemetry-proto's `ExportTraceServiceRequest` and keeps both the bytes and the spans.

`spans()` flattens what arrived into `Span`s (hex ids, attributes as a dict, the resource's
attributes); `bodies` are the request bodies as received after decompression, for checking
that a secret never left the process.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.support.threaded_app import ThreadedApp
from tests.support.waiting import wait_until

SPAN_KIND_SERVER = 2  # opentelemetry.proto.trace.v1.Span.SpanKind
SPAN_KIND_CLIENT = 3


@dataclass
class Span:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    resource: dict[str, Any] = field(default_factory=dict)


def any_value(value: Any) -> Any:
    """An OTLP AnyValue as Python (strings, ints, floats, bools, lists of them)."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, which)


def attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in pairs}


class OtlpReceiver(ThreadedApp):
    thread_name = "otlp-receiver"
    handler_cancellation = False

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []
        self.paths: list[str] = []
        self._spans: list[Span] = []
        self._lock = threading.Lock()

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        with self._lock:
            self.paths.append(f"{request.method} {request.path}")
        if request.method != "POST" or request.path != "/v1/traces":
            return web.Response(status=404)
        encoding = request.headers.get("Content-Encoding", "").lower()
        if encoding == "gzip":
            raw = gzip.decompress(raw)
        elif encoding == "deflate":
            raw = zlib.decompress(raw)
        message = ExportTraceServiceRequest()
        message.ParseFromString(raw)
        spans = [
            Span(
                name=span.name,
                kind=span.kind,
                trace_id=span.trace_id.hex(),
                span_id=span.span_id.hex(),
                parent_span_id=span.parent_span_id.hex(),
                start_ns=span.start_time_unix_nano,
                end_ns=span.end_time_unix_nano,
                attributes=attributes(span.attributes),
                resource=attributes(resource_spans.resource.attributes),
            )
            for resource_spans in message.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]
        with self._lock:
            self.bodies.append(raw)
            self._spans.extend(spans)
        answer = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=answer, content_type="application/x-protobuf")

    def spans(self, trace_id: str | None = None) -> list[Span]:
        with self._lock:
            found = list(self._spans)
        return [s for s in found if trace_id is None or s.trace_id == trace_id]

    def wait_for_names(self, trace_id: str, names: set[str], timeout: float = 10.0) -> bool:
        """Poll until spans of every name in `names` arrived for `trace_id`."""
        return wait_until(
            lambda: names <= {s.name for s in self.spans(trace_id)}, timeout, every=0.05
        )
