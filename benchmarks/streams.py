"""The streaming benchmark: a lean SSE upstream and a client that times every chunk.

The upstream (`python -m benchmarks.streams --port N`, its own process) answers any request
with an SSE stream of `x-bench-chunks` events `x-bench-gap-ms` apart, each stamped with the
`time.monotonic_ns()` at which it was written. The client reads the stream through a target
(direct, nginx, edge) and subtracts: a chunk's delay is its arrival time minus its stamp
(CLOCK_MONOTONIC is one clock for every process on the machine). What a proxy adds is its
delay distribution minus the direct one, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import time
from dataclasses import dataclass, field

from edge.demo import sse_chunk

STAMP = re.compile(rb'"sent_ns":(\d+),')
DONE = b"data: [DONE]"


def event(i: int) -> bytes:
    """A chunk stamped with when it is written (`sent_ns`, before `choices`: see STAMP)."""
    delta = {"content": f"tok{i} "}
    return sse_chunk("chatcmpl-bench", 0, "bench", delta, sent_ns=time.monotonic_ns())


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HTTP/1.1 with keep-alive: every request gets a chunked SSE answer."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            headers = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            await reader.readexactly(int(headers.get(b"content-length", b"0")))
            count = int(headers.get(b"x-bench-chunks", b"50"))
            gap = int(headers.get(b"x-bench-gap-ms", b"20")) / 1000
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            for i in range(count):
                if i:
                    await asyncio.sleep(gap)
                writer.write(_chunk(event(i)))
            writer.write(_chunk(DONE + b"\n\n") + b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(_serve_one, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


@dataclass
class StreamTiming:
    ttfb_ms: float  # request written -> first event read
    delays_ms: list[float] = field(default_factory=list)  # per event: read - written
    events: int = 0
    status: int = 0


async def one_stream(
    port: int, path: str, key: str | None, chunks: int, gap_ms: int
) -> StreamTiming:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = b'{"model":"bench","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        f"x-bench-chunks: {chunks}",
        f"x-bench-gap-ms: {gap_ms}",
        "Connection: close",
    ]
    if key:
        head.append(f"Authorization: Bearer {key}")
    started = time.monotonic_ns()
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    timing = StreamTiming(ttfb_ms=0.0)
    try:
        status_line = await reader.readuntil(b"\r\n")
        timing.status = int(status_line.split()[1])
        await reader.readuntil(b"\r\n\r\n")
        pending = b""
        while True:
            data = await reader.read(65536)
            now = time.monotonic_ns()
            if not data:
                break
            pending += data
            last = 0
            for m in STAMP.finditer(pending):
                if timing.events == 0:
                    timing.ttfb_ms = (now - started) / 1e6
                timing.delays_ms.append((now - int(m.group(1))) / 1e6)
                timing.events += 1
                last = m.end()
            if DONE in pending:
                break
            pending = pending[last:]
    finally:
        writer.close()
    return timing


async def streams_at_once(
    port: int, path: str, key: str | None, count: int, chunks: int, gap_ms: int
) -> list[StreamTiming]:
    """`count` streams started together; bounded by the stream length plus a margin."""
    runs = [one_stream(port, path, key, chunks, gap_ms) for _ in range(count)]
    limit = chunks * gap_ms / 1000 + 30
    return list(await asyncio.wait_for(asyncio.gather(*runs), limit))


def summarize(timings: list[StreamTiming]) -> dict[str, float]:
    delays = sorted(d for t in timings for d in t.delays_ms)
    ttfbs = sorted(t.ttfb_ms for t in timings)
    return {
        "chunk_p50_ms": _percentile(delays, 50),
        "chunk_p99_ms": _percentile(delays, 99),
        "ttfb_p50_ms": statistics.median(ttfbs),
        "ttfb_max_ms": ttfbs[-1],
        "events": sum(t.events for t in timings),
        "failed_streams": sum(1 for t in timings if t.status != 200),
    }


def _percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, round(p / 100 * len(values) + 0.5) - 1))
    return values[index]


def main() -> None:
    parser = argparse.ArgumentParser(description="the SSE upstream of the streaming benchmark")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import uvloop  # uvicorn[standard] brings it

    uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
