"""Relaying an upstream's answer to the client, piece by piece as it arrives (or in one write
when it is already whole), and naming upstream failures in the client's terms."""

from __future__ import annotations

from collections.abc import Callable

from edge import errors
from edge.proxy.exchange import Exchange
from edge.proxy.metering import Meter
from edge.proxy.policy import response_headers
from edge.proxy.sinks import counted, metered
from edge.transport.link import ResponseCycle
from edge.transport.upstream.errors import BadResponse, PoolFull, UpstreamError, describe
from edge.transport.upstream.response import Response, Sink


class Relay:
    """`log(key, message, *args)`: the data plane's throttled warning."""

    def __init__(self, log: Callable[..., None], keepalive: float = 0.0) -> None:
        self.log = log
        self.keepalive = keepalive  # server.sse_keepalive: seconds of silence (0: off)

    async def answer(self, resp: Response, ex: Exchange, meter: Meter | None = None) -> None:
        """Send the upstream's answer on: in one write when it is already whole, else piece by
        piece as it arrives. A cut upstream body ends the client's response without its
        final chunk (the connection closes), so a cut answer is never mistaken for a whole
        one. A metered request's answer passes through its `meter` on the way."""
        send = ex.send
        ex.started = True
        ex.status = resp.status
        headers, sse = response_headers(resp.headers)
        if meter is not None:
            meter.start(resp.status, resp.headers)
            if meter.changes_bytes:  # a chunk may be taken out: the length is edge's to frame
                headers = [(n, v) for n, v in headers if n != b"content-length"]
        headers += ex.rate_headers
        link = ex.link
        if resp.done and link is not None:  # the whole answer is in: one write, if it can be
            body = await resp.read()
            if meter is not None:
                body = meter.observe(body) + meter.end()
            if ex.note is not None:
                ex.note.response_bytes = len(body)
            ex.stop()
            if link.cycle.answer(resp.status, headers, body):
                return
            await send({"type": "http.response.start", "status": resp.status, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        if link is not None and link.cycle.start_stream(resp.status, headers, resp.has_body):
            # Under edge's server: from here the upstream connection's own callback writes
            # each piece to the client as it arrives (Response.pipe); this task just waits.
            link.on_writable = resp.resume
            sink: Sink = link.cycle.pipe_body
            if meter is not None:
                sink = metered(meter, sink)
            if ex.note is not None:
                sink = counted(ex.note, sink)
            keepalive = None
            if sse and self.keepalive and link.cycle.chunked_encoding:
                keepalive = KeepAlive(resp, link.cycle, self.keepalive)
            try:
                await resp.pipe(sink)
            except UpstreamError as exc:
                self.cut(ex, describe(exc))
            finally:
                link.on_writable = None
                if keepalive is not None:
                    keepalive.stop()
            ex.stop()
            return
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        try:
            while True:
                chunk = await resp.read()
                if meter is not None:
                    chunk = meter.observe(chunk) + (meter.end() if resp.done else b"")
                if ex.note is not None:
                    ex.note.response_bytes += len(chunk)
                if resp.done:  # read() hands over all that arrived: this is the last piece
                    ex.stop()
                    await send({"type": "http.response.body", "body": chunk, "more_body": False})
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamError as exc:
            self.cut(ex, describe(exc))

    def cut(self, ex: Exchange, why: str) -> None:
        ex.stop()
        ex.outcome = "upstream_cut"
        self.log(
            "upstream-cut", "upstream body cut mid-way (%s); ending the client's response", why
        )

    def error(self, exc: UpstreamError, upstream: str) -> errors.EdgeError:
        """The client's answer for an upstream failure, logged (throttled) with its cause."""
        why = describe(exc)
        if isinstance(exc, PoolFull):  # edge's own limit, not the upstream's slowness
            self.log("upstream-busy", "upstream pool full: %s (upstream %s)", why, upstream)
            return errors.UpstreamBusy()
        if exc.timeout:  # connect and read deadlines alike
            self.log("upstream-timeout", "upstream timed out: %s (upstream %s)", why, upstream)
            return errors.UpstreamTimeout()
        if isinstance(exc, BadResponse):
            self.log("upstream-bad", "bad upstream response: %s (upstream %s)", why, upstream)
            return errors.BadUpstreamResponse()
        self.log("upstream-error", "upstream unreachable: %s (upstream %s)", why, upstream)
        return errors.UpstreamUnreachable()


class KeepAlive:
    """`server.sse_keepalive`: while an SSE answer's upstream is silent (a reasoning model
    thinking before its first token, or between two), an SSE comment every `every` seconds,
    so load balancers and proxies that cut idle connections keep this one. Only between
    events (a comment inside one would corrupt it); SDKs skip comments. A timer per stream,
    nothing per piece: the upstream connection already notes when it last sent a byte, and
    the answer keeps its last bytes."""

    COMMENT = b": keepalive\n\n"

    def __init__(self, resp: Response, cycle: ResponseCycle, every: float) -> None:
        self.resp = resp
        self.cycle = cycle
        self.every = every
        self.loop = resp.loop  # not asyncio.get_running_loop(): a getpid() call per stream
        self.handle = self.loop.call_later(every, self._tick)

    def _tick(self) -> None:
        resp, cycle = self.resp, self.cycle
        if resp.done or cycle.response_complete:
            return
        silent = self.loop.time() - resp.last_read
        wait = self.every - silent
        if wait <= 0.001:
            if not resp.paused and resp.between_events:  # paused: the client is the slow one
                cycle.pipe_body(self.COMMENT, True)
            wait = self.every
        self.handle = self.loop.call_later(wait, self._tick)

    def stop(self) -> None:
        self.handle.cancel()
