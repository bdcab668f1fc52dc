"""An OpenAI-style upstream whose chat streams keep a timetable, for the SSE keep-alive tests.

It runs in a background thread on a free loopback port (aiohttp, like tests/support/
fake_upstream.py). `POST …/chat/completions` with `"stream": true` answers `text/event-stream`
at once (with `Cache-Control: max-age=60, public` and `X-Accel-Buffering: yes`, which edge is to
replace), then writes EVENTS and `data: [DONE]` on this timetable, each pause set by a request
header in seconds (absent: no pause):

    headers sent
    x-paced-first: S     silence before the first event
    event 0, event 1
    x-paced-gap: S       silence between event 1 and event 2
    event 2, then the first half of event 3 (cut inside its `data:` line)
    x-paced-split: S     silence inside event 3
    the rest of event 3, event 4, `data: [DONE]`

(`x-paced-tag: T` names the stream in `streams`, with when each write happened.)

So `STREAM` is every byte the upstream sends. Any other request gets a small JSON echo.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from tests.support.threaded_app import ThreadedApp

UPSTREAM_CACHE_CONTROL = "max-age=60, public"
UPSTREAM_ACCEL_BUFFERING = "yes"


def _event(i: int) -> bytes:
    chunk = {
        "id": "chatcmpl-paced",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "paced-model",
        "choices": [
            {"index": 0, "delta": {"content": f"p{i}"}, "finish_reason": "stop" if i == 4 else None}
        ],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


EVENTS = [_event(i) for i in range(5)]
DONE = b"data: [DONE]\n\n"
STREAM = b"".join(EVENTS) + DONE
SPLIT_AT = len(EVENTS[3]) // 2  # inside event 3's JSON
CONTENTS = [(f"p{i}", "stop" if i == 4 else None) for i in range(5)]


@dataclass
class Paced:
    """One stream as the upstream sent it: when each write happened (monotonic)."""

    started: float
    tag: str  # the request's x-paced-tag
    writes: list[tuple[float, bytes]] = field(default_factory=list)
    completed: bool = False
    client_gone: bool = False


class PacedUpstream(ThreadedApp):
    thread_name = "paced-upstream"
    backlog = 128

    def __init__(self) -> None:
        super().__init__()
        self.streams: list[Paced] = []

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.method == "POST" and request.path.endswith("/chat/completions"):
            try:
                stream = orjson.loads(body).get("stream") is True
            except (orjson.JSONDecodeError, AttributeError):
                stream = False
            if stream:
                return await self._stream(request)
        payload = orjson.dumps({"object": "echo", "method": request.method, "path": request.path})
        return web.Response(body=payload, content_type="application/json")

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        h = request.headers
        first = float(h.get("x-paced-first", "0"))
        gap = float(h.get("x-paced-gap", "0"))
        split = float(h.get("x-paced-split", "0"))
        paced = Paced(started=time.monotonic(), tag=h.get("x-paced-tag", ""))
        self.streams.append(paced)
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": UPSTREAM_CACHE_CONTROL,
                "X-Accel-Buffering": UPSTREAM_ACCEL_BUFFERING,
            }
        )

        async def write(data: bytes) -> None:
            await resp.write(data)
            paced.writes.append((time.monotonic(), data))

        async def pause(seconds: float) -> None:
            if seconds:
                await asyncio.sleep(seconds)

        try:
            await resp.prepare(request)
            await pause(first)
            await write(EVENTS[0])
            await write(EVENTS[1])
            await pause(gap)
            await write(EVENTS[2])
            await write(EVENTS[3][:SPLIT_AT])
            await pause(split)
            await write(EVENTS[3][SPLIT_AT:])
            await write(EVENTS[4])
            await write(DONE)
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            paced.client_gone = True
            raise
        paced.completed = True
        return resp
