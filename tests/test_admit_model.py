"""A model-based property test of admit.lua (hypothesis): random schedules of requests, time
jumps (state rewinds), limit changes, pauses, rotations, expiries, scopes and credit changes,
garbage values included, run against a real redis-server and against fakeredis (embedded
mode), every decision, header value and write compared with a pure-Python reference
(`tests/support/admit_model.py`, written from the script's header).

Redis time cannot be controlled, so each step reads the record, both buckets and Redis TIME,
asks the reference what the script must do from that state, runs the script and compares. The
script's clock is up to a few ms later than the one read: where that can matter (a bucket
within a hair of a whole token, a reset time), the comparison allows it, and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge import keys
from edge.control.records import text_fields
from edge.redis import clients as connection
from edge.redis.scripts import Script
from tests.support.admit_model import decide, level
from tests.support.redis_server import RedisServer

PLANS = {"free": (20, 1000), "tiny": (2, 5), "big": (600, 100_000)}
PLAN_ARGS = [x for name, (rpm, rpd) in PLANS.items() for x in (name, rpm, rpd)]
SLACK_MS = 25  # how much later the script's clock may be than the one read before it
ROUTES = ["chat/completions", "embeddings", "models", "models/gpt-4o", "files/x"]
MODELS = ["", "~", "!", "=gpt-4o", "=gpt-4o-mini", "=o1", "=claude"]

limits = st.one_of(
    st.none(), st.integers(0, 30).map(str), st.sampled_from(["abc", "-1", "1e3", "", "9" * 13])
)
times = st.one_of(st.none(), st.sampled_from(["soon", "", "1"]), st.integers(-90, 90))
scopes = st.one_of(
    st.none(),
    st.sampled_from(["{not json", "null", "[1]", "[]", "{}", '"x"']),
    st.builds(
        lambda r, m: json.dumps({"routes": r, "models": m}),
        st.lists(st.sampled_from(["chat/completions", "models", "embeddings"]), max_size=2),
        st.lists(st.sampled_from(["gpt-4o*", "o?", "claude"]), max_size=2),
    ),
)
request = st.tuples(
    st.just("request"),
    st.sampled_from(["key", "key", "key", "old", "other"]),
    st.sampled_from(ROUTES),
    st.sampled_from(MODELS),
)
change = st.one_of(
    st.tuples(st.just("rewind"), st.sampled_from([1, 2, 3, 30, 61, 3600, 90_000])),
    st.tuples(st.just("field"), st.sampled_from(["rpm", "rpd"]), limits),
    st.tuples(st.just("field"), st.just("plan"), st.sampled_from(["free", "tiny", "gold"])),
    st.tuples(
        st.just("field"),
        st.just("status"),
        st.sampled_from(["active", "active", "paused", "", "revoked", "Active?"]),
    ),
    st.tuples(st.just("field"), st.just("credits"), st.one_of(st.none(), limits)),
    st.tuples(st.just("field"), st.just("scopes"), scopes),
    st.tuples(st.just("expires"), times),
    st.tuples(st.just("rotate"), st.sampled_from([0, 5, 120])),
    st.tuples(
        st.just("bucket"),
        st.sampled_from(["m", "d"]),
        st.sampled_from(["abc", "nan", "1e309", "-5", "-inf"]),
    ),
)
# Mostly requests, and small limits to start from, so schedules reach empty buckets, spent
# credits and expiries rather than stopping short of them.
start = st.tuples(
    st.just("start"),
    st.sampled_from(["tiny", "free", "big"]),
    st.one_of(st.none(), st.integers(0, 6).map(str)),
    st.one_of(st.none(), st.integers(0, 12).map(str)),
    st.one_of(st.none(), st.integers(0, 4).map(str)),
)
steps = st.builds(
    lambda first, rest: [first, *rest],
    start,
    st.lists(st.one_of(request, request, request, change), min_size=10, max_size=80),
)


class Key:
    """One key's names and secrets for a schedule."""

    def __init__(self) -> None:
        self.kid = keys.new_kid()
        self.record = keys.record_key(self.kid)
        self.minute, self.day = keys.bucket_keys(self.kid)
        self.current = keys.make_key("gw_sk_", self.kid)
        self.old = keys.make_key("gw_sk_", self.kid)  # a previous key, once rotated
        self.other = keys.make_key("gw_sk_", self.kid)  # never valid


async def now_ms(client: Any) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def run_schedule(client: Any, schedule: list[tuple[Any, ...]]) -> int:
    """Apply `schedule` to a fresh key; compare every request with the reference. Returns the
    number of requests compared."""
    admit = Script("admit")
    k = Key()
    await client.hset(
        k.record,
        mapping={"hash": keys.key_hash(k.current), "plan": "free", "status": "active"},
    )
    compared = 0
    for step in schedule:
        kind = step[0]
        if kind == "start":
            fields = {"plan": step[1], "rpm": step[2], "rpd": step[3], "credits": step[4]}
            await client.hset(k.record, mapping={n: v for n, v in fields.items() if v})
        elif kind == "request":
            await compare(client, admit, k, *step[1:])
            compared += 1
        elif kind == "rewind":
            await rewind(client, k, step[1])
        elif kind == "field":
            _, name, value = step
            if value is None:
                await client.hdel(k.record, name)
            else:
                await client.hset(k.record, name, value)
        elif kind == "expires":
            value = step[1]
            if isinstance(value, int):
                value = str((await now_ms(client)) // 1000 + value)
            if value is None:
                await client.hdel(k.record, "expires")
            else:
                await client.hset(k.record, "expires", value)
        elif kind == "rotate":
            now_s = (await now_ms(client)) // 1000
            k.old, k.current = k.current, keys.make_key("gw_sk_", k.kid)
            await client.hset(
                k.record,
                mapping={
                    "prev_hash": keys.key_hash(k.old),
                    "prev_until": now_s + step[1],
                    "hash": keys.key_hash(k.current),
                },
            )
        elif kind == "bucket":
            await client.hset(k.minute if step[1] == "m" else k.day, "tokens", step[2])
    return compared


async def rewind(client: Any, k: Key, seconds: int) -> None:
    """Move the key's state `seconds` into the past: the same as that much time passing."""
    for bucket in (k.minute, k.day):
        ts = await client.hget(bucket, "ts")
        if ts is not None:
            with contextlib.suppress(ValueError):
                await client.hset(bucket, "ts", float(ts) - seconds * 1000)
    for name in ("prev_until", "expires"):
        value = await client.hget(k.record, name)
        if value is not None and value.isdigit():
            await client.hset(k.record, name, int(value) - seconds)


async def compare(client: Any, admit: Script, k: Key, who: str, route: str, model: str) -> None:
    presented = {"key": k.current, "old": k.old, "other": k.other}[who]
    record = text_fields(await client.hgetall(k.record))
    minute = text_fields(await client.hgetall(k.minute))
    day = text_fields(await client.hgetall(k.day))
    before = await now_ms(client)
    args = (keys.key_hash(presented), route, model, *PLAN_ARGS)
    reply = [int(v) if isinstance(v, int) else v.decode() for v in await admit(
        client, (k.record, k.minute, k.day), args
    )]  # fmt: skip
    after = await now_ms(client)
    expected = decide(record, minute, day, before, keys.key_hash(presented), route, model, PLANS)
    if reply != expected.reply:
        # The script read Redis time somewhere between the two readings (a loaded machine can
        # stall this process between them): compare with the reference at every SLACK_MS step.
        moments = range(before + SLACK_MS, max(after, before + SLACK_MS) + 1, SLACK_MS)
        laters = [
            decide(record, minute, day, t, keys.key_hash(presented), route, model, PLANS).reply
            for t in moments
        ]
        assert close(reply, expected.reply) or any(close(reply, r) for r in laters), (
            f"admit.lua answered {reply}, the reference {expected.reply} (or {laters}) "
            f"for record={record} minute={minute} day={day}"
        )
    if reply[0] == 0:
        await check_writes(client, k, record, minute, day, reply)
    else:
        after = text_fields(await client.hgetall(k.record))
        assert after == record, "a rejection wrote to the record"


def close(got: list[Any], want: list[Any]) -> bool:
    """Equal, except reset and retry times may differ by the clock slack."""
    if len(got) != len(want) or got[:2] != want[:2]:
        return False
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        slack = SLACK_MS + 1 if i in (5, 7, 8) else 0
        if abs(int(a) - int(b)) > slack if i >= 2 else a != b:
            return False
    return True


async def check_writes(
    client: Any, k: Key, record: dict[str, str], minute: dict[str, str], day: dict[str, str],
    reply: list[Any],
) -> None:  # fmt: skip
    """After an admission: both buckets one token lower than their level, the counters."""
    after = text_fields(await client.hgetall(k.record))
    requests = after.get("requests")
    old = record.get("requests")
    assert requests == (str(int(old) + 1) if old and old.isdigit() and len(old) <= 12 else "1")
    if reply[9] >= 0:
        assert after.get("credits") == str(reply[9])
    now = await now_ms(client)
    for bucket, state, cap, window in ((k.minute, minute, reply[2], 60_000),
                                       (k.day, day, reply[3], 86_400_000)):  # fmt: skip
        stored = text_fields(await client.hgetall(bucket))
        low, _ = level(state, cap, window, now - 2 * SLACK_MS)
        high, _ = level(state, cap, window, now)
        tokens = float(stored["tokens"])
        assert low - 1 - 1e-6 <= tokens <= high - 1 + 1e-6 or tokens == 0
        assert 0 < await client.pttl(bucket) <= window + 1000 + 2 * window


def run(factory: Callable[[], Any], schedule: list[tuple[Any, ...]]) -> int:
    async def go() -> int:
        client = factory()
        try:
            return await run_schedule(client, schedule)
        finally:
            await client.aclose()

    return asyncio.run(go())


@pytest.mark.slow
@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(schedule=steps)
def test_admit_lua_matches_the_reference_on_redis(
    redis_server: RedisServer, schedule: list[tuple[Any, ...]]
) -> None:
    run(lambda: redis.asyncio.Redis.from_url(redis_server.url), schedule)


@pytest.mark.slow
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=steps)
def test_admit_lua_matches_the_reference_on_fakeredis(schedule: list[tuple[Any, ...]]) -> None:
    """Embedded mode: the same script on fakeredis's Lua gives the same answers."""
    run(connection.embedded, schedule)
