"""Embedded mode (DESIGN §3 `EDGE_REDIS_URL` unset, `EDGE_UPSTREAM_URL` unset): `edge serve` runs
on an in-process fakeredis with the built-in demo upstream, prints a demo key once, and that key
works for plain and streaming chat completions.

Also checks that admit.lua decides identically on fakeredis (the embedded mode) and on the real
redis-server (DESIGN §4: fakeredis only where the embedded mode itself is under test).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx
import redis.asyncio

from edge import connection, keys
from edge.limiter import Code, decode, plan_args
from edge.scripts import Script
from edge.settings import load_settings
from tests.support.edge_process import CONFIG, PROVIDER_KEY, EdgeProcess, edge_env
from tests.support.fake_upstream import FakeUpstream
from tests.support.redis_server import RedisServer

PREFIX = "gw_sk_"
DEMO_KEY = re.compile(rf"{PREFIX}[0-9A-Za-z]{{{keys.BODY_LEN}}}")
CHAT = {"model": "edge-demo", "messages": [{"role": "user", "content": "Hello"}]}


def test_embedded_mode_demo_key_and_upstream(
    spawn_edge: Callable[..., EdgeProcess],
) -> None:
    proc = spawn_edge(edge_env("", ""), name="embedded")
    log = proc.log()
    assert "EMBEDDED REDIS" in log
    assert "DEMO UPSTREAM" in log
    found = DEMO_KEY.findall(log)
    assert found, f"no demo key in the start-up banner:\n{log}"
    key = found[0]
    assert set(found) == {key}, "exactly one demo key is printed"
    assert keys.KeyFormat(PREFIX).parse(key.encode()) is not None

    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=proc.url, timeout=10) as client:
        plain = client.post("/v1/chat/completions", headers=auth, json=CHAT)
        assert plain.status_code == 200, plain.text
        assert plain.headers["content-type"].startswith("application/json")
        content = plain.json()["choices"][0]["message"]["content"]
        assert "demo" in content.lower()

        with client.stream(
            "POST", "/v1/chat/completions", headers=auth, json={**CHAT, "stream": True}
        ) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["content-type"].startswith("text/event-stream")
            body = streamed.read().decode()
        assert body.rstrip().endswith("data: [DONE]")
        assert body.count("data: ") > 2

        models = client.get("/v1/models", headers=auth)
        assert models.status_code == 200, models.text
        assert models.json()["object"] == "list"

        typo = key[:-1] + ("x" if key[-1] != "x" else "y")
        for wrong in (keys.make_key(PREFIX, keys.new_kid()), typo, "nonsense"):
            resp = client.get("/v1/models", headers={"Authorization": f"Bearer {wrong}"})
            assert resp.status_code == 401, wrong
            assert resp.json()["error"]["code"] == "invalid_api_key"


async def admit_script_run(client: Any) -> list[tuple[int, str, int, int, int, int]]:
    """A scripted sequence on one fresh key with rpm=3, as (code, plan, rpm, rpd, minute
    remaining, day remaining) per admit call."""
    admit, create, status = Script("admit"), Script("create"), Script("status")
    plans = plan_args(load_settings(CONFIG, {}).plans)
    kid = keys.new_kid()
    key = keys.make_key(PREFIX, kid)
    record = keys.record_key(kid)
    bucket_keys = (record, *keys.bucket_keys(kid))
    assert await create(client, [record], [keys.key_hash(key), "plan", "free", "rpm", 3]) != 0

    async def call(presented: str, kid_keys: tuple[str, ...] = bucket_keys) -> tuple[Any, ...]:
        d = decode(await admit(client, kid_keys, (keys.key_hash(presented), *plans)))
        return (d.code, d.plan, d.rpm, d.rpd, d.minute_remaining, d.day_remaining)

    out = [await call(key) for _ in range(4)]
    out.append(await call(keys.make_key(PREFIX, kid)))  # right kid, wrong secret
    other = keys.new_kid()
    out.append(await call(key, (keys.record_key(other), *keys.bucket_keys(other))))
    await status(client, [record], ["paused"])
    out.append(await call(key))
    await status(client, [record], ["revoked"])
    out.append(await call(key))
    return out


async def test_admit_lua_same_on_fakeredis_and_redis(redis_server: RedisServer) -> None:
    fake = connection.embedded()
    real = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        on_fake = await admit_script_run(fake)
        on_real = await admit_script_run(real)
    finally:
        await fake.aclose()
        await real.aclose()

    assert on_fake == on_real
    assert on_real == [
        (Code.ADMITTED, "free", 3, 1000, 2, 999),
        (Code.ADMITTED, "free", 3, 1000, 1, 998),
        (Code.ADMITTED, "free", 3, 1000, 0, 997),
        (Code.MINUTE_EMPTY, "free", 3, 1000, 0, 997),
        (Code.UNKNOWN, "", 0, 0, 0, 0),
        (Code.UNKNOWN, "", 0, 0, 0, 0),
        (Code.PAUSED, "free", 0, 0, 0, 0),
        (Code.REVOKED, "free", 0, 0, 0, 0),
    ]


def test_embedded_with_a_real_upstream_prints_no_key_unless_asked(
    spawn_edge: Callable[..., EdgeProcess], upstream: FakeUpstream
) -> None:
    """A key printed to a console or log collector would spend the operator's provider
    account: with a real upstream, embedded mode creates none unless `--demo-key` asks."""
    quiet = spawn_edge(edge_env("", upstream.url), name="embedded-real")
    log = quiet.log()
    assert "EMBEDDED REDIS" in log and "--demo-key" in log
    assert DEMO_KEY.findall(log) == []
    assert "DEMO UPSTREAM" not in log

    asked = spawn_edge(edge_env("", upstream.url), name="embedded-asked", args=("--demo-key",))
    [key] = set(DEMO_KEY.findall(asked.log()))
    resp = httpx.get(f"{asked.url}/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 200
    assert upstream.records[-1].header("authorization") == f"Bearer {PROVIDER_KEY}"
