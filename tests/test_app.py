"""edge/app.py in process: the composition root, and JSON for unexpected exceptions.

httpx's ASGITransport buffers whole bodies, so streaming lives in the end-to-end files; here
the point is what the app answers when its own code fails.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from edge.app import Edge, create_app
from edge.settings import load_settings
from tests.support.edge_process import CONFIG
from tests.support.fake_upstream import FakeUpstream
from tests.support.keys import new_key
from tests.support.raw_upstream import RawUpstream
from tests.support.redis_server import RedisServer


@pytest.fixture
async def app(redis_server: RedisServer, upstream: FakeUpstream) -> AsyncIterator[Edge]:
    settings = load_settings(
        CONFIG, {"EDGE_REDIS_URL": redis_server.url, "EDGE_UPSTREAM_URL": upstream.url}
    )
    edge = create_app(settings)
    async with edge._lifespan(edge.control):
        yield edge


def client(app: Edge) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://edge")


async def test_proxy_answers_through_the_app(app: Edge, redis_server: RedisServer) -> None:
    key, _ = new_key(redis_server.url)
    async with client(app) as c:
        resp = await c.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 200
    assert resp.headers["x-ratelimit-remaining-requests"] == "19"


async def test_exception_in_the_proxy_is_a_json_500(
    app: Edge,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    key, _ = new_key(redis_server.url)

    async def boom(*_: object) -> None:
        raise RuntimeError("kaboom-internal-detail")

    assert app.proxy.rt is not None
    monkeypatch.setattr(app.proxy.live.limiter, "admit", boom)
    async with client(app) as c:
        resp = await c.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 500
    assert resp.headers["content-type"] == "application/json"
    assert resp.json()["error"]["code"] == "internal_error"
    assert "kaboom" not in resp.text and "Traceback" not in resp.text
    assert "kaboom-internal-detail" in caplog.text  # logged for the operator
    assert key not in caplog.text


async def test_exception_in_the_control_plane_is_a_json_500(
    app: Edge, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom() -> bytes:
        raise RuntimeError("kaboom")

    assert app.proxy.rt is not None
    monkeypatch.setattr(app.proxy.rt.metrics, "exposition", boom)
    async with client(app) as c:
        resp = await c.get("/metrics")
    assert resp.status_code == 500
    assert resp.json()["error"]["type"] == "server_error"
    assert "kaboom" not in resp.text


async def test_min_connections_are_open_before_the_app_serves(redis_server: RedisServer) -> None:
    """`upstream.min_connections`: a new instance opens them during start-up, so its first
    burst of streams does not pay a connect (against https, a TLS handshake) per stream."""
    upstream = RawUpstream().start()
    try:
        env = {
            "EDGE_REDIS_URL": redis_server.url,
            "EDGE_UPSTREAM_URL": upstream.url,
            "EDGE_UPSTREAM_MIN_CONNECTIONS": "3",
        }
        edge = create_app(load_settings(CONFIG, env))
        async with edge._lifespan(edge.control):
            assert upstream.wait_for(lambda: len(upstream.connections) == 3, 2)
            key, _ = new_key(redis_server.url)
            async with client(edge) as c:
                resp = await c.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert resp.status_code == 200
            assert len(upstream.connections) == 3  # served on one of them: none opened
    finally:
        upstream.stop()
