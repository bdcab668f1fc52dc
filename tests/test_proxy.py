"""edge/proxy/handler.py in-process, with a real Redis: what only a broken dependency can show.

The upstream boundary catches what the upstream client raises (UpstreamError) and nothing
else: an edge bug inside the upstream call is a logged 500, never passed off as "502 upstream
unreachable".
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from edge.proxy.handler import Proxy
from edge.runtime import open_runtime
from edge.settings import load_settings
from edge.transport.upstream.pool import Origin
from tests.support.edge_process import CONFIG
from tests.support.keys import new_key
from tests.support.redis_server import RedisServer


class BrokenPool:
    """Stands in for the upstream pool: fails the way a bug in edge's own code would."""

    origin = Origin("http://127.0.0.1:9/v1")

    async def request(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug, not a network error")

    async def close(self) -> None:
        pass


async def call(proxy: Proxy, key: str) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/v1/models",
        "raw_path": b"/v1/models",
        "query_string": b"",
        "headers": [(b"authorization", f"Bearer {key}".encode())],
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await proxy(scope, receive, send)
    return sent


async def test_an_edge_bug_in_the_upstream_call_is_a_logged_500(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    key, _ = new_key(redis_server.url, "pro")
    env = {"EDGE_REDIS_URL": redis_server.url, "EDGE_UPSTREAM_URL": "http://127.0.0.1:9/v1"}
    async with open_runtime(load_settings(CONFIG, env)) as rt:
        target = rt.live.router.first
        real = target.pool
        target.pool = BrokenPool()  # type: ignore[assignment]
        proxy = Proxy()
        proxy.bind(rt)
        try:
            start, body = await call(proxy, key)
        finally:
            target.pool = real
    assert start["status"] == 500
    error = orjson.loads(body["body"])["error"]
    assert (error["type"], error["code"]) == ("server_error", "internal_error")
    assert "unexpected error" in caplog.text and "RuntimeError: a bug" in caplog.text
    assert key not in caplog.text
