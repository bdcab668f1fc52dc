"""Model-scope globs in admit.lua: the same verdicts as a regular expression, in bounded time.

admit.lua matches globs piece by piece (never with a backtracking pattern, which let one
request keep Redis busy for seconds). Hypothesis draws globs and models from an alphabet full
of the characters Lua patterns treat as magic, and admit.lua's verdict (admitted or out of
scope) is compared with the reference's regular expression, on a real redis-server and on
the embedded fakeredis. The worst cases the old patterns had are timed on the real server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge import keys
from edge.redis import clients as connection
from edge.redis.scripts import Scripts
from tests.support.admit_model import glob_matches
from tests.support.redis_server import RedisServer

ALPHABET = "ab-.%^$()[]+*?"
PLANS = ["free", 1000, 100_000, -1, -1]
KEY = "gw_sk_" + "g" * 44
ADMITTED, OUT_OF_SCOPE = 0, 8

globs = st.text(ALPHABET, min_size=1, max_size=10)
models = st.text(ALPHABET.replace("*", "").replace("?", "") + "?*", min_size=1, max_size=12)


async def verdict(client: Any, glob: str, model: str) -> int:
    """admit.lua's code for `model` on a fresh key whose only scope is `glob`."""
    kid = keys.new_kid()
    await client.hset(
        keys.record_key(kid),
        mapping={"hash": keys.key_hash(KEY), "plan": "free", "scopes": json.dumps(
            {"models": [glob]}
        )},
    )  # fmt: skip
    script = Scripts().admit
    reply = await script(
        client, keys.admit_keys(kid), [keys.key_hash(KEY), "x", "=" + model, 1, 90, *PLANS]
    )
    await client.delete(*keys.admit_keys(kid))
    return int(reply[0])


def check_all(factory: Callable[[], Any], cases: list[tuple[str, str]]) -> None:
    async def go() -> None:
        client = factory()
        try:
            for glob, model in cases:
                want = ADMITTED if glob_matches(glob, model) else OUT_OF_SCOPE
                got = await verdict(client, glob, model)
                assert got == want, f"glob {glob!r} model {model!r}: {got}, expected {want}"
        finally:
            await client.aclose()

    asyncio.run(go())


cases = st.lists(st.tuples(globs, models), min_size=1, max_size=20)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases=cases)
def test_globs_match_like_the_reference_on_redis(
    redis_server: RedisServer, cases: list[tuple[str, str]]
) -> None:
    check_all(lambda: redis.asyncio.Redis.from_url(redis_server.url), cases)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases=cases)
def test_globs_match_like_the_reference_on_fakeredis(cases: list[tuple[str, str]]) -> None:
    check_all(connection.embedded, cases)


@pytest.mark.parametrize("glob", ["*-*-*-*x", "*-*-*-*-*y", "*?*?*?*?*?*?*?*?z", "*" * 60 + "x"])
def test_the_old_backtracking_cases_take_microseconds(redis_server: RedisServer, glob: str) -> None:
    """`*-*-*-*-*y` against 256 `-` kept Redis busy for about 40 s as a Lua pattern."""

    async def go() -> float:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            await verdict(client, "warm", "warm")
            start = time.perf_counter()
            assert await verdict(client, glob, "-" * 256) == OUT_OF_SCOPE
            return time.perf_counter() - start
        finally:
            await client.aclose()

    assert asyncio.run(go()) < 0.05
