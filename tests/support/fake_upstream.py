"""An OpenAI-compatible fake provider on a free loopback port, run in a background thread.

It records every request it receives (method, path, query, raw headers, body) and notices when
its client goes away (`client_gone`). Without knobs it answers like OpenAI (edge's own demo
handlers: models, chat completions plain and streaming, embeddings). Knobs, as request headers:

  x-fake-status: N          answer N with a JSON error body
  x-fake-delay-ms: N        wait N ms before answering (headers included)
  x-fake-header-delay-ms: N same, named for the header-timeout tests
  x-fake-chunks: N          stream N SSE events, then `data: [DONE]`
  x-fake-gap-ms: N          wait N ms between events
  x-fake-reset-after: K     after K events, reset the connection (RST)
  x-fake-reset-after-body   read the whole body, then reset without answering
  x-fake-gzip: 1            gzip the body and say `Content-Encoding: gzip`
  x-fake-gzip: accepted     the same, but only if the request's Accept-Encoding allows gzip
  x-fake-header: Name: v    add a response header (repeatable)
  x-fake-api: responses      answer /v1/responses as the Responses API does (edge's demo
                            handler, usage included); without it that path echoes
  x-fake-unframed: close|reset  answer with a body that has no length framing (no
                            Content-Length, not chunked: it ends when the connection does),
                            x-fake-chunks events 20 ms apart, then close cleanly or reset
  x-fake-echo: 1            answer 200 `message/http` with the request as received (request line
                            and headers), as Apache answers TRACE
  x-fake-go-json: 1         decode the body as Go's encoding/json fills a struct field `Model`
                            (keys matched ignoring case, escapes decoded, the last match wins)
                            and answer {"object": "go-json", "model": <the model it would run>}
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from edge import demo
from tests.support.threaded_app import ThreadedApp
from tests.support.waiting import wait_until


@dataclass
class Record:
    method: str
    path: str
    query: str
    raw_headers: list[tuple[bytes, bytes]]
    body: bytes
    body_sha256: str
    body_length: int
    received_at: float
    sent_sha256: str = ""
    sent_bytes: int = 0
    completed: bool = False
    client_gone: float | None = None
    events: list[str] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = self.headers(name)
        return values[0] if values else None

    def headers(self, name: str) -> list[str]:
        lname = name.lower().encode()
        return [v.decode("latin-1") for n, v in self.raw_headers if n.lower() == lname]

    def header_names(self) -> set[str]:
        return {n.decode("latin-1").lower() for n, _ in self.raw_headers}


def _rst(request: web.Request) -> None:
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _echo(request: web.Request, rec: Record) -> tuple[web.Response, list[tuple[str, str]], bytes]:
    """The request as received, the way a server with TRACE enabled sends it back."""
    version = f"HTTP/{request.version.major}.{request.version.minor}"
    lines = [f"{request.method} {request.raw_path} {version}".encode("latin-1")]
    lines += [name + b": " + value for name, value in rec.raw_headers]
    payload = b"\r\n".join(lines) + b"\r\n\r\n"
    return web.Response(body=payload, content_type="message/http"), [], payload


def go_json_model(body: bytes) -> str | None:
    """The `Model` a Go service decoding `body` with encoding/json would see: every top-level
    key equal to "model" ignoring case (after unescaping) sets the field, so the last wins.
    (Go folds with Unicode simple folding; for "model" that adds nothing beyond ASCII case.)"""
    try:
        pairs = json.loads(body, object_pairs_hook=_Pairs)
    except ValueError:
        return None
    model = None
    for name, value in pairs if isinstance(pairs, _Pairs) else ():
        if name.lower() == "model" and isinstance(value, str):
            model = value
    return model


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its (key, value) pairs, in order, duplicates kept."""


def _sse_event(i: int) -> bytes:
    return demo.sse_chunk("chatcmpl-fake", 0, "fake", {"content": f"tok{i} "})


class FakeUpstream(ThreadedApp):
    thread_name = "fake-upstream"
    client_max_size = 1024**3

    def __init__(self) -> None:
        super().__init__()
        self.records: list[Record] = []

    def clear(self) -> None:
        self.records.clear()

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> bool:
        return wait_until(predicate, timeout, every=0.01)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        rec = Record(
            method=request.method,
            path=request.raw_path.split("?", 1)[0],
            query=request.raw_path.partition("?")[2],  # as sent, still percent-encoded
            raw_headers=list(request.raw_headers),
            body=body if len(body) <= 1024 * 1024 else b"",
            body_sha256=hashlib.sha256(body).hexdigest(),
            body_length=len(body),
            received_at=time.monotonic(),
        )
        self.records.append(rec)
        try:
            return await self._answer(request, rec)
        except (asyncio.CancelledError, ConnectionResetError):
            rec.client_gone = time.monotonic()
            raise

    async def _answer(self, request: web.Request, rec: Record) -> web.StreamResponse:
        h = request.headers
        delay = int(h.get("x-fake-delay-ms") or h.get("x-fake-header-delay-ms") or 0)
        if "x-fake-reset-after-body" in h:
            _rst(request)
            raise ConnectionResetError
        if delay:
            await asyncio.sleep(delay / 1000)
        extra: list[tuple[str, str]] = []
        for line in h.getall("x-fake-header", []):
            name, _, value = line.partition(":")
            extra.append((name.strip(), value.strip()))
        if h.get("x-fake-echo") == "1":
            return self._finish(rec, *_echo(request, rec))
        if h.get("x-fake-go-json") == "1":
            payload = orjson.dumps({"object": "go-json", "model": go_json_model(rec.body)})
            decoded = web.Response(body=payload, content_type="application/json")
            return self._finish(rec, decoded, extra, payload)
        if "x-fake-unframed" in h:
            return await self._unframed(request, rec, h["x-fake-unframed"] == "reset")
        if "x-fake-chunks" in h:
            return await self._stream(request, rec, extra)
        if "x-fake-status" in h:
            status = int(h["x-fake-status"])
            payload = orjson.dumps(
                {
                    "error": {
                        "message": f"fake {status}",
                        "type": "fake_error",
                        "param": None,
                        "code": "fake",
                    }
                }
            )
            return self._finish(
                rec,
                web.Response(body=payload, status=status, content_type="application/json"),
                extra,
                payload,
            )
        gzip_ok = "gzip" in h.get("accept-encoding", "")
        if h.get("x-fake-gzip") == "1" or (h.get("x-fake-gzip") == "accepted" and gzip_ok):
            payload = gzip.compress(orjson.dumps({"object": "fake", "path": request.path}) * 50)
            resp = web.Response(body=payload, content_type="application/json")
            resp.headers["Content-Encoding"] = "gzip"
            return self._finish(rec, resp, extra, payload)
        resp = await self._openai(request)
        payload = (
            resp.body if isinstance(resp, web.Response) and isinstance(resp.body, bytes) else b""
        )
        if isinstance(resp, web.Response):
            return self._finish(rec, resp, extra, payload)
        rec.completed = True
        return resp

    def _finish(
        self, rec: Record, resp: web.Response, extra: list[tuple[str, str]], payload: bytes
    ) -> web.Response:
        for name, value in extra:
            resp.headers.add(name, value)
        rec.sent_sha256 = hashlib.sha256(payload).hexdigest()
        rec.sent_bytes = len(payload)
        rec.completed = True
        return resp

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._demo(request)
        except demo.BadBody as bad:  # OpenAI's 400, as the demo app's middleware answers it
            return bad.response

    async def _demo(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == "/v1/models" and request.method == "GET":
            return await demo.models(request)
        if path == "/v1/chat/completions" and request.method == "POST":
            return await demo.chat(request)
        if path == "/v1/embeddings" and request.method == "POST":
            return await demo.embeddings(request)
        if path == "/v1/completions" and request.method == "POST":
            return await demo.completions(request)
        if path == "/v1/responses" and request.headers.get("x-fake-api") == "responses":
            return await demo.responses(request)  # else /v1/responses echoes, as it always did
        payload = orjson.dumps({"object": "echo", "method": request.method, "path": path})
        return web.Response(body=payload, content_type="application/json")

    async def _unframed(self, request: web.Request, rec: Record, reset: bool) -> web.Response:
        """Written straight to the socket: aiohttp's server always frames its responses."""
        transport = request.transport
        assert transport is not None
        count = int(request.headers.get("x-fake-chunks", "3"))
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
        transport.write(b"Connection: close\r\n\r\n")
        digest = hashlib.sha256()
        for i in range(count):
            await asyncio.sleep(0.02)
            event = _sse_event(i)
            digest.update(event)
            rec.sent_bytes += len(event)
            transport.write(event)
        rec.sent_sha256 = digest.hexdigest()
        await asyncio.sleep(0.05)  # let the bytes leave before an RST could discard them
        rec.events.append("reset" if reset else "closed")
        if reset:
            _rst(request)
        else:
            rec.completed = True
            transport.close()
        raise ConnectionResetError  # the response is written; aiohttp must add nothing

    async def _stream(
        self, request: web.Request, rec: Record, extra: list[tuple[str, str]]
    ) -> web.StreamResponse:
        h = request.headers
        count = int(h["x-fake-chunks"])
        gap = int(h.get("x-fake-gap-ms", "0")) / 1000
        reset_after = int(h.get("x-fake-reset-after", "-1"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        for name, value in extra:
            resp.headers.add(name, value)
        await resp.prepare(request)
        digest = hashlib.sha256()
        for i in range(count):
            if i == reset_after:
                rec.events.append("reset")
                _rst(request)
                raise ConnectionResetError
            if i and gap:
                await asyncio.sleep(gap)
            event = _sse_event(i)
            digest.update(event)
            rec.sent_bytes += len(event)
            rec.sent_sha256 = digest.hexdigest()
            rec.events.append(f"sent {i} at {time.monotonic():.4f}")
            await resp.write(event)
        if reset_after == count:
            _rst(request)
            raise ConnectionResetError
        done = b"data: [DONE]\n\n"
        digest.update(done)
        rec.sent_bytes += len(done)
        rec.sent_sha256 = digest.hexdigest()
        await resp.write(done)
        await resp.write_eof()
        rec.completed = True
        return resp
