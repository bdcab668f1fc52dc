"""A small OpenAI-style upstream with a name, for the tests of several upstreams and reloads.

It runs in a background thread on a free loopback port (aiohttp, like tests/support/
fake_upstream.py), records every request (method, path, body, headers) and says who it is:
every answer carries `x-upstream-name: <name>`.

  POST …/chat/completions   a chat completion whose content is "from <name>", the request's
                            model echoed; with "stream": true, `chunks` SSE events (content
                            "from <name> <i>"), a usage event when stream_options.include_usage
                            asks for one, then `data: [DONE]`
  GET  …/models             {"object": "list", "data": [...]} from `models`, owned_by <name>
  GET  …/models/<id>        that model
  anything else             {"object": "echo", "upstream": <name>, "method": …, "path": …}

Knobs, set from the test: `fail_next(n, status)` (the next n requests get that status and an
OpenAI-style error body), `models`, `chunks`, `chunk_delay` (seconds between stream events).
Several upstreams may share one `Failures`: then the next n requests any of them receives fail,
whichever upstream an edge tries first. Per request, as headers (edge forwards them):

  x-named-chunks: N         stream N events
  x-named-chunk-delay: S    S seconds between events
  x-named-reset-after: K    after K events, reset the connection (RST)
  x-named-delay: S          wait S seconds before answering (headers included)
  x-named-reset: 1          read the request, then reset the connection without answering

And the text of edge's config file for them (`edge_config`, `write_config`, `edge_env_for`).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from tests.support.fake_upstream import _rst
from tests.support.threaded_app import ThreadedApp
from tests.support.waiting import wait_until

USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


@dataclass
class Seen:
    """One request as the upstream received it, and how it was answered."""

    upstream: str  # the name of the upstream that received it
    method: str
    path: str
    body: bytes
    raw_headers: list[tuple[str, str]]
    at: float
    status: int = 0
    events: int = 0  # stream events sent
    completed: bool = False

    def header(self, name: str) -> str | None:
        lname = name.lower()
        return next((v for n, v in self.raw_headers if n.lower() == lname), None)

    def json(self) -> Any:
        return json.loads(self.body)


class Failures:
    """How many of the next requests fail, and with which status (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._left = 0
        self._status = 503

    def set(self, n: int, status: int = 503) -> None:
        with self._lock:
            self._left, self._status = n, status

    def take(self) -> int | None:
        """The status to fail this request with, or None."""
        with self._lock:
            if self._left <= 0:
                return None
            self._left -= 1
            return self._status

    @property
    def left(self) -> int:
        with self._lock:
            return self._left


class NamedUpstream(ThreadedApp):
    thread_name = "named-upstream"

    def __init__(
        self,
        name: str,
        models: list[str] | None = None,
        *,
        chunks: int = 3,
        chunk_delay: float = 0.0,
        failures: Failures | None = None,
    ) -> None:
        super().__init__()
        self.thread_name = f"upstream-{name}"
        self.name = name
        self.models = list(models if models is not None else ["gpt-4o", "gpt-4o-mini"])
        self.chunks = chunks
        self.chunk_delay = chunk_delay
        self.failures = failures or Failures()
        self.records: list[Seen] = []

    # Life cycle.

    # Knobs and reading.

    def fail_next(self, n: int, status: int = 503) -> None:
        """Answer the next `n` requests (of every upstream sharing `failures`) with `status`."""
        self.failures.set(n, status)

    def clear(self) -> None:
        self.records.clear()

    def posts(self, suffix: str = "/chat/completions") -> list[Seen]:
        return [s for s in self.records if s.method == "POST" and s.path.endswith(suffix)]

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> bool:
        return wait_until(predicate, timeout, every=0.01)

    # Answers.

    def _headers(self) -> dict[str, str]:
        return {"x-upstream-name": self.name}

    def _json(self, seen: Seen, payload: Any, status: int = 200) -> web.Response:
        seen.status = status
        seen.completed = True
        return web.Response(
            body=orjson.dumps(payload),
            status=status,
            content_type="application/json",
            headers=self._headers(),
        )

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen = Seen(
            upstream=self.name,
            method=request.method,
            path=request.path,
            body=body,
            raw_headers=[
                (n.decode("latin-1"), v.decode("latin-1")) for n, v in request.raw_headers
            ],
            at=time.monotonic(),
        )
        self.records.append(seen)
        delay = float(request.headers.get("x-named-delay", "0"))
        if delay:
            await asyncio.sleep(delay)
        if request.headers.get("x-named-reset") == "1":
            _rst(request)
            raise ConnectionResetError
        status = self.failures.take()
        if status is not None:
            error = {
                "message": f"{self.name} failed with {status}",
                "type": "server_error",
                "param": None,
                "code": None,
            }
            return self._json(seen, {"error": error}, status)
        path = request.path
        if request.method == "POST" and path.endswith("/chat/completions"):
            return await self._chat(request, seen)
        if request.method == "GET" and path.endswith("/models"):
            data = [
                {"id": m, "object": "model", "created": 0, "owned_by": self.name}
                for m in self.models
            ]
            return self._json(seen, {"object": "list", "data": data})
        if request.method == "GET" and "/models/" in path:
            model = path.rsplit("/models/", 1)[1]
            return self._json(seen, {"id": model, "object": "model", "owned_by": self.name})
        echo = {"object": "echo", "upstream": self.name, "method": request.method, "path": path}
        return self._json(seen, echo)

    async def _chat(self, request: web.Request, seen: Seen) -> web.StreamResponse:
        try:
            parsed = json.loads(seen.body)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            error = {"message": "bad body", "type": "invalid_request_error", "param": None}
            return self._json(seen, {"error": {**error, "code": None}}, 400)
        model = parsed.get("model")
        if parsed.get("stream") is True:
            options = parsed.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            return await self._stream(request, seen, model, usage)
        message = {"role": "assistant", "content": f"from {self.name}"}
        return self._json(
            seen,
            {
                "id": f"chatcmpl-{self.name}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": USAGE,
            },
        )

    def _event(self, model: Any, choices: list[Any], usage: Any = None) -> bytes:
        chunk = {
            "id": f"chatcmpl-{self.name}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
        }
        if usage is not None:
            chunk["usage"] = usage
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    async def _stream(
        self, request: web.Request, seen: Seen, model: Any, usage: bool
    ) -> web.StreamResponse:
        h = request.headers
        count = int(h.get("x-named-chunks", self.chunks))
        gap = float(h.get("x-named-chunk-delay", self.chunk_delay))
        reset_after = int(h.get("x-named-reset-after", "-1"))
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        resp.headers.update(self._headers())
        seen.status = 200
        await resp.prepare(request)
        for i in range(count):
            if i == reset_after:
                _rst(request)
                raise ConnectionResetError
            if i and gap:
                await asyncio.sleep(gap)
            delta = {"content": f"from {self.name} {i} "}
            await resp.write(self._event(model, [{"index": 0, "delta": delta}]))
            seen.events += 1
        if reset_after == count:
            _rst(request)
            raise ConnectionResetError
        stop = [{"index": 0, "delta": {}, "finish_reason": "stop"}]
        await resp.write(self._event(model, stop))
        if usage:
            await resp.write(self._event(model, [], USAGE))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        seen.completed = True
        return resp


# edge's configuration for these tests.

PLANS: dict[str, dict[str, int]] = {
    "free": {"rpm": 20, "rpd": 1000},
    "pro": {"rpm": 200, "rpd": 50_000},
    "team": {"rpm": 1000, "rpd": 250_000},
}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string, for the plain text used here
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def _table(header: str, values: dict[str, Any]) -> list[str]:
    return [header, *(f"{name} = {toml_value(value)}" for name, value in values.items()), ""]


def edge_config(
    upstreams: list[dict[str, Any]] | None = None,
    routing: dict[str, Any] | None = None,
    *,
    upstream: dict[str, Any] | None = None,
    plans: dict[str, dict[str, int]] | None = None,
    sections: dict[str, dict[str, Any]] | None = None,
) -> str:
    """The text of an edge config file: `sections` ([server], [usage], …), `[upstream]`, the
    plans (free, pro and team as shipped unless given), `[[upstreams]]` and `[routing]`."""
    lines: list[str] = []
    for name, values in (sections or {}).items():
        lines += _table(f"[{name}]", values)
    if upstream is not None:
        lines += _table("[upstream]", upstream)
    for name, values in (plans or PLANS).items():
        lines += _table(f"[plans.{name}]", values)
    for entry in upstreams or []:
        lines += _table("[[upstreams]]", entry)
    if routing is not None:
        lines += _table("[routing]", routing)
    return "\n".join(lines)


def write_config(path: Path, text: str) -> Path:
    """Write `path` whole at once (a reload never reads half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def edge_env_for(redis_url: str, config: Path, **extra: str) -> dict[str, str]:
    """edge's environment for a config file that names its upstreams: no EDGE_UPSTREAM_*."""
    return {
        "EDGE_CONFIG": str(config),
        "EDGE_REDIS_URL": redis_url,
        "EDGE_LOG_LEVEL": "info",
        "EDGE_SERVER_DRAIN_DELAY": "0",
        **extra,
    }
