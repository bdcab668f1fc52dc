"""Sinks an upstream answer's pieces pass through on their way to the client, when a feature
needs to see them: the metering of a metered key, the byte count of the access log. A request
that uses neither is piped straight to the client's transport."""

from __future__ import annotations

from edge.proxy.exchange import AccessNote
from edge.proxy.metering import Meter
from edge.transport.upstream.response import Sink


def metered(meter: Meter, sink: Sink) -> Sink:
    """`sink`, with each piece passed through `meter` first (which may hold part of it back
    until an SSE event ends, or take a usage chunk out)."""

    def pipe(data: bytes, more: bool) -> bool:
        out = meter.observe(data)
        if not more:
            out += meter.end()
        return sink(out, more)

    return pipe


def counted(note: AccessNote, sink: Sink) -> Sink:
    """`sink`, counting what it is given for the access log."""

    def pipe(data: bytes, more: bool) -> bool:
        note.response_bytes += len(data)
        return sink(data, more)

    return pipe
