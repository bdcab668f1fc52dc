"""Embedded mode (`EDGE_REDIS_URL` and `EDGE_UPSTREAM_URL` unset): `edge serve` runs
on an in-process fakeredis with the built-in demo upstream, prints a demo key once, and that key
works for plain and streaming chat completions.

Also checks that admit.lua decides identically on fakeredis (the embedded mode) and on the real
redis-server (fakeredis only where the embedded mode itself is under test).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx
import redis.asyncio

from edge import keys
from edge.proxy.admission import Code, decode, plan_args
from edge.redis import clients as connection
from edge.redis.scripts import Script
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


async def admit_script_run(client: Any) -> list[tuple[Any, ...]]:
    """A scripted sequence per admit call, as (code, plan, rpm, rpd, minute remaining, day
    remaining, credits (None: unlimited), model scoped): a key with rpm=3, then a scoped key
    with 2 credits."""
    admit, create, status = Script("admit"), Script("create"), Script("status")
    plans = plan_args(load_settings(CONFIG, {}).plans)

    async def new(*fields: str | int) -> tuple[str, tuple[str, ...]]:
        kid = keys.new_kid()
        key = keys.make_key(PREFIX, kid)
        record = keys.record_key(kid)
        assert await create(client, [record], [keys.key_hash(key), "plan", "free", *fields]) != 0
        return key, keys.admit_keys(kid)

    async def call(
        presented: str, kid_keys: tuple[str, ...], route: str = "models", model: str = ""
    ) -> tuple[Any, ...]:
        reply = await admit(
            client, kid_keys, (keys.key_hash(presented), route, model, 1, 90, *plans)
        )
        d = decode(reply)
        return (
            d.code,
            d.plan,
            d.rpm,
            d.rpd,
            d.minute_remaining,
            d.day_remaining,
            d.credits if d.has_balance else None,
            d.model_scoped,
        )

    key, kid_keys = await new("rpm", 3)
    out = [await call(key, kid_keys) for _ in range(4)]
    out.append(await call(keys.make_key(PREFIX, kid_keys[0][10:-1]), kid_keys))  # wrong secret
    other = keys.new_kid()
    out.append(await call(key, keys.admit_keys(other)))
    scopes = '{"routes": ["chat/completions"], "models": ["gpt-4o*", "o?"]}'
    scoped, scoped_keys = await new("scopes", scopes, "credits", 2)
    chat = "chat/completions"
    out.append(await call(scoped, scoped_keys, "embeddings", "=gpt-4o"))  # route outside
    out.append(await call(scoped, scoped_keys, chat))  # model needed
    out.append(await call(scoped, scoped_keys, chat, "!"))  # body without a model
    out.append(await call(scoped, scoped_keys, chat, "=gpt-3.5-turbo"))  # model outside
    out.append(await call(scoped, scoped_keys, chat + "/x", "=gpt-4o-mini"))
    out.append(await call(scoped, scoped_keys, chat, "=o1"))
    out.append(await call(scoped, scoped_keys, chat, "=o1"))  # no credits left
    await status(client, [kid_keys[0]], ["paused"])
    out.append(await call(key, kid_keys))
    await status(client, [kid_keys[0]], ["revoked"])
    out.append(await call(key, kid_keys))
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
    free, none = None, ("", 0, 0, 0, 0, None, False)
    assert on_real == [
        (Code.ADMITTED, "free", 3, 1000, 2, 999, free, False),
        (Code.ADMITTED, "free", 3, 1000, 1, 998, free, False),
        (Code.ADMITTED, "free", 3, 1000, 0, 997, free, False),
        (Code.MINUTE_EMPTY, "free", 3, 1000, 0, 997, free, False),
        (Code.UNKNOWN, *none),
        (Code.UNKNOWN, *none),
        (Code.OUT_OF_SCOPE, "free", 1, 0, 0, 0, 2, True),  # rpm's place: 1, the route
        (Code.NEED_MODEL, "free", 0, 0, 0, 0, 2, True),
        (Code.MODEL_UNREADABLE, "free", 0, 0, 0, 0, 2, True),
        (Code.OUT_OF_SCOPE, "free", 2, 0, 0, 0, 2, True),  # 2: the model
        (Code.ADMITTED, "free", 20, 1000, 19, 999, 1, True),
        (Code.ADMITTED, "free", 20, 1000, 18, 998, 0, True),
        (Code.NO_CREDITS, "free", 0, 0, 0, 0, 0, True),
        (Code.PAUSED, "free", 0, 0, 0, 0, None, False),
        (Code.REVOKED, "free", 0, 0, 0, 0, None, False),
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
