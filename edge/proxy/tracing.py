"""Optional OpenTelemetry tracing (`pip install edge[otel]`, `tracing.otlp_endpoint`): one span
per `/v1` request (`edge.request`, SERVER), with children for the admission (`edge.admission`:
the Redis call) and each upstream attempt (`edge.upstream`, CLIENT, until the answer's head).

A client's W3C `traceparent` continues its trace, and the upstream gets the `edge.upstream`
span's own `traceparent` (the client's is replaced, not forwarded). Spans are exported by
OTLP/HTTP from a background thread (the SDK's BatchSpanProcessor), never on the request path.
Attributes name the plan, outcome, status, upstream and key id, never the key. Off (the
default), none of this is imported and a request pays one `is None` test.
"""

from __future__ import annotations

from typing import Any

TRACE_HEADERS = frozenset({b"traceparent", b"tracestate"})
EXPORT_DELAY_MS = 500  # how long spans wait to go out in a batch


class Tracing:
    """The tracer provider and exporter of one running app (not the process-wide globals:
    tests run many apps in one process)."""

    def __init__(self, endpoint: str, service_name: str, sample_ratio: float = 1.0) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
            from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError:
            raise RuntimeError(
                "tracing.otlp_endpoint is set but OpenTelemetry is not installed: "
                "pip install 'edge[otel]'"
            ) from None
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": service_name}),
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
        )
        exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
        processor = BatchSpanProcessor(exporter, schedule_delay_millis=EXPORT_DELAY_MS)
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("edge")
        self.propagator = TraceContextTextMapPropagator()
        self.in_context = set_span_in_context
        self.kinds = SpanKind
        self.error = Status(StatusCode.ERROR)

    def start(self, headers: list[tuple[bytes, bytes]], method: str, path: str) -> RequestTrace:
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in headers
            if name in TRACE_HEADERS
        }
        parent = self.propagator.extract(carrier) if carrier else None
        span = self.tracer.start_span(
            "edge.request",
            context=parent,
            kind=self.kinds.SERVER,
            attributes={"http.request.method": method, "url.path": path},
        )
        return RequestTrace(self, span)

    def shutdown(self) -> None:
        """Export what is left and stop (blocks: called off the event loop)."""
        self.provider.shutdown()


class RequestTrace:
    """One request's spans."""

    __slots__ = ("context", "root", "tracing")

    def __init__(self, tracing: Tracing, root: Any) -> None:
        self.tracing = tracing
        self.root = root
        self.context = tracing.in_context(root)

    def admission(self) -> Any:
        return self.tracing.tracer.start_span("edge.admission", context=self.context)

    def upstream(self, name: str) -> tuple[Any, list[tuple[bytes, bytes]]]:
        """An upstream attempt's span, and the headers that carry it to the upstream."""
        t = self.tracing
        span = t.tracer.start_span(
            "edge.upstream",
            context=self.context,
            kind=t.kinds.CLIENT,
            attributes={"edge.upstream": name},
        )
        carrier: dict[str, str] = {}
        t.propagator.inject(carrier, context=t.in_context(span))
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in carrier.items()]
        return span, headers

    def failed(self, span: Any, why: str) -> None:
        span.set_status(self.tracing.error)
        span.set_attribute("edge.error", why)

    def finish(self, kid: str | None, plan: str, outcome: str | None, status: int) -> None:
        root = self.root
        if kid is not None:
            root.set_attribute("edge.key_id", kid)  # the public id, never the key
        root.set_attribute("edge.plan", plan)
        if outcome is not None:
            root.set_attribute("edge.outcome", outcome)
        if status:
            root.set_attribute("http.response.status_code", status)
            if status >= 500:
                root.set_status(self.tracing.error)
        root.end()
