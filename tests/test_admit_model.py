"""A model-based property test of admit.lua (hypothesis): random schedules of requests, time
jumps (state rewinds), limit changes, pauses, rotations, expiries, scopes, credit changes and
settlements (settle.lua, which must never fail after a charge), garbage values included, run
against a real redis-server and against fakeredis (embedded mode), every decision, header
value and write compared with a pure-Python reference (`tests/support/admit_model.py`,
written from the scripts' headers).

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
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edge import keys
from edge.control.records import text_fields
from edge.redis import clients as connection
from edge.redis.scripts import Script
from tests.support.admit_model import decide, level, settle_record
from tests.support.redis_server import RedisServer

# name → (rpm, rpd, tpm, tpd); -1: no token limit
PLANS = {
    "free": (20, 1000, -1, -1, 0),
    "tiny": (2, 5, 40, 90, 0),
    "big": (600, 100_000, 5_000, -1, 0),
    "watch": (2, 4, 30, -1, 1),  # shadow: observed, not enforced
}
PLAN_ARGS = [x for name, limits in PLANS.items() for x in (name, *limits)]
RETENTION_DAYS = 90
BUCKETS = ("m", "d", "tm", "td")
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
    st.tuples(st.just("field"), st.sampled_from(["rpm", "rpd", "tpm", "tpd"]), limits),
    st.tuples(
        st.just("field"), st.just("plan"), st.sampled_from(["free", "tiny", "gold", "watch"])
    ),
    st.tuples(
        st.just("field"),
        st.just("shadow"),
        st.sampled_from([None, "1", "0", "true", "false", "yes", ""]),
    ),
    st.tuples(
        st.just("field"),
        st.just("status"),
        st.sampled_from(["active", "active", "paused", "", "revoked", "Active?"]),
    ),
    st.tuples(
        st.just("field"),
        st.just("credits"),
        st.one_of(st.none(), limits, st.sampled_from(["-3", "-1", "--1", "-"])),
    ),
    st.tuples(st.just("field"), st.just("scopes"), scopes),
    st.tuples(st.just("expires"), times),
    st.tuples(st.just("rotate"), st.sampled_from([0, 5, 120])),
    st.tuples(
        st.just("bucket"),
        st.sampled_from(BUCKETS),
        st.sampled_from(["abc", "nan", "1e309", "-5", "-inf", "-30", "-1e9", "0.5", "12"]),
    ),
)
# A settlement (settle.lua) of a metered answer: tokens in and out, the cost in micro-credits
# and the token limits it is charged against; garbage in the fields it reads.
settlement = st.tuples(
    st.just("settle"),
    st.sampled_from([0, 1, 7, 250, 40_000]),
    st.sampled_from([0, 3, 999, 60_000]),
    st.sampled_from([0, 1, 999_999, 1_000_000, 2_500_001, 10**12]),
    st.sampled_from([-1, 0, 40, 5_000]),
    st.sampled_from([-1, 90]),
)
settle_garbage = st.tuples(
    st.just("field"),
    st.sampled_from(["tokens", "credit_micros"]),
    st.sampled_from([None, "abc", "", "-5", "1e3", "9" * 16, "999999", "1000000", "12\n", "7"]),
)
# A token bucket in debt (after a large answer was settled), or at a hair above zero.
debt = st.tuples(
    st.just("debt"), st.sampled_from(["tm", "td"]), st.sampled_from([-5000, -30, -1, 0, 0.5, 3])
)
# Mostly requests, and small limits to start from, so schedules reach empty buckets, spent
# credits and expiries rather than stopping short of them.
start = st.tuples(
    st.just("start"),
    st.sampled_from(["tiny", "free", "big", "watch"]),
    st.one_of(st.none(), st.integers(0, 6).map(str)),
    st.one_of(st.none(), st.integers(0, 12).map(str)),
    st.one_of(st.none(), st.integers(0, 4).map(str)),
    st.sampled_from([1, 1, 0, 3]),  # the request price
)
steps = st.builds(
    lambda first, rest: [first, *rest],
    start,
    st.lists(
        st.one_of(request, request, request, change, debt, settlement, settle_garbage),
        min_size=10,
        max_size=80,
    ),
)


# Always tried as well: both token windows in debt, refilled by time, charged by price.
REQUEST = ("request", "key", "chat/completions", "")
TOKEN_DEBT: list[tuple[Any, ...]] = [
    ("start", "tiny", "6", "12", "9", 3),
    REQUEST,
    ("debt", "tm", -30),
    REQUEST,  # minute tokens in debt: 12
    ("debt", "td", -5000),
    REQUEST,  # both: the day's (13)
    ("debt", "tm", 0.5),
    REQUEST,  # a hair above zero: admitted, when the day is not in debt
    ("debt", "td", 3),
    REQUEST,
    ("rewind", 30),
    REQUEST,
    ("field", "tpm", "2"),
    ("field", "credits", "-3"),
    REQUEST,  # in debt on credits: 402
    ("field", "credits", "5"),
    ("field", "credit_micros", "garbage"),
    ("settle", 40_000, 60_000, 2_500_001, 40, 90),  # both token buckets deep in debt
    REQUEST,
    ("field", "tokens", "9" * 16),
    ("settle", 1, 0, 999_999, -1, -1),
    REQUEST,
]


class Key:
    """One key's names and secrets for a schedule."""

    def __init__(self) -> None:
        self.kid = keys.new_kid()
        self.record = keys.record_key(self.kid)
        self.keys = keys.admit_keys(self.kid)  # record, m, d, tm, td
        self.buckets = dict(zip(BUCKETS, self.keys[1:], strict=True))
        self.minute, self.day = self.buckets["m"], self.buckets["d"]
        self.price = 1
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
            k.price = step[5]
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
        elif kind == "settle":
            await check_settle(client, k, *step[1:])
        elif kind == "debt":
            bucket = k.buckets[step[1]]
            await client.hset(bucket, mapping={"tokens": step[2], "ts": await now_ms(client)})
        elif kind == "bucket":  # a bucket state: garbage, or one in debt (token buckets)
            bucket = k.buckets[step[1]]
            await client.hset(bucket, "tokens", step[2])
            await client.hsetnx(bucket, "ts", await now_ms(client))
    return compared


async def rewind(client: Any, k: Key, seconds: int) -> None:
    """Move the key's state `seconds` into the past: the same as that much time passing."""
    for bucket in k.buckets.values():
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
    buckets = {name: text_fields(await client.hgetall(b)) for name, b in k.buckets.items()}
    before = await now_ms(client)
    history = await usage(client, k, before)
    args = (keys.key_hash(presented), route, model, k.price, RETENTION_DAYS, *PLAN_ARGS)
    reply = [int(v) if isinstance(v, int) else v.decode() for v in await admit(
        client, k.keys, args
    )]  # fmt: skip
    after = await now_ms(client)
    presented_hash = keys.key_hash(presented)

    def reference(moment: int) -> list[Any]:
        return decide(record, buckets, moment, presented_hash, route, model, PLANS, k.price).reply

    expected = reference(before)
    if reply != expected:
        # The script read Redis time somewhere between the two readings (a loaded machine can
        # stall this process between them): compare with the reference at every ms of them
        # (a token bucket refilling at 5,000 a minute gains a whole token in 12 ms).
        moments = range(before + 1, max(after, before + SLACK_MS) + 1)
        laters = [reference(t) for t in moments]
        assert close(reply, expected) or any(close(reply, r) for r in laters), (
            f"admit.lua answered {reply}, the reference {expected} (or {laters}) "
            f"for record={record} buckets={buckets}"
        )
    for name in ("tm", "td"):  # admission never charges the token buckets: settlement does
        assert text_fields(await client.hgetall(k.buckets[name])) == buckets[name]
    if reply[0] == 0:
        await check_writes(client, k, record, buckets["m"], buckets["d"], reply)
    elif reply[0] in SHADOWED:  # admitted in shadow: the record's side, and no bucket charged
        await check_writes(client, k, record, buckets["m"], buckets["d"], reply, charged=False)
    else:
        written = text_fields(await client.hgetall(k.record))
        kept = {n: v for n, v in written.items() if n not in PREVIOUS_KEY_FIELDS}
        assert kept == {n: v for n, v in record.items() if n not in PREVIOUS_KEY_FIELDS}, (
            "a rejection wrote to the record"
        )
    await check_previous_key(client, k, record, who, reply[0], after)
    await check_usage(client, k, history, before, after, reply, k.price)


PREVIOUS_KEY_FIELDS = ("previous_key_requests", "previous_key_last_used")
RATE_LIMITED, REJECTED, SHADOWED = {5, 6, 12, 13}, {2, 3, 4, 7, 8, 9, 11}, {14, 15, 16, 17}


async def usage(client: Any, k: Key, ms: int) -> tuple[str, str, dict[str, str], dict[str, str]]:
    """The day and hour usage hashes of the key at Redis time `ms`: names and contents."""
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    day = keys.usage_day_key(k.kid, moment.strftime("%Y-%m-%d"))
    hour = keys.usage_hour_key(k.kid, moment.strftime("%Y-%m-%dT%H"))
    return (
        day,
        hour,
        text_fields(await client.hgetall(day)),
        text_fields(await client.hgetall(hour)),
    )


async def check_usage(
    client: Any, k: Key, history: tuple[str, str, dict[str, str], dict[str, str]],
    before: int, after: int, reply: list[Any], price: int,
) -> None:  # fmt: skip
    """An answer to an authenticated key counts once in its day and hour, by its outcome."""
    day, hour, day_was, hour_was = history
    then = await usage(client, k, after)
    if then[:2] != (day, hour):
        return  # the hour turned during the call: which one counted is the script's clock
    code = reply[0]
    field = (
        "requests" if code == 0 or code in SHADOWED else "rate_limited" if code in RATE_LIMITED
        else "rejected" if code in REJECTED else None
    )  # fmt: skip
    admitted = code == 0 or code in SHADOWED
    spent = price if admitted and reply[10] & 4 and price > 0 else 0
    for was, now in ((day_was, then[2]), (hour_was, then[3])):
        want = dict(was)
        for name, n in ((field, 1), ("credits", spent)):
            if name is not None and n:
                old = was.get(name)
                want[name] = str(int(old) + n if old and old.lstrip("-").isdigit() else n)
        assert now == want, f"usage after answer {code}: {now}, expected {want}"
    if field is not None:
        day_end = (before // 86_400_000 + 1) * 86_400
        ttl = await client.ttl(day)
        assert 0 < ttl <= day_end + RETENTION_DAYS * 86_400 - before // 1000 + 1
        assert 0 < await client.ttl(hour) <= 49 * 3600


async def check_previous_key(
    client: Any, k: Key, record: dict[str, str], who: str, code: int, after: int
) -> None:
    """Every answer to the previous secret but 1 and 10 counts in the record."""
    written = text_fields(await client.hgetall(k.record))
    counted = who == "old" and code not in (1, 10)
    old = record.get("previous_key_requests")
    if not counted:
        assert written.get("previous_key_requests") == old
        return
    want = str(int(old) + 1) if old and old.isdigit() and len(old) <= 12 else "1"
    assert written.get("previous_key_requests") == want
    used = int(written["previous_key_last_used"])
    assert abs(used - after // 1000) <= 1


async def check_settle(
    client: Any, k: Key, tokens_in: int, tokens_out: int, cost: int, tpm: int, tpd: int
) -> None:
    """One settle.lua call: it never fails, whatever the record holds, and writes what the
    reference says (the record exactly; each token bucket its level less the tokens used)."""
    record = text_fields(await client.hgetall(k.record))
    states = {name: text_fields(await client.hgetall(k.buckets[name])) for name in ("tm", "td")}
    before = await now_ms(client)
    ident = f"{before}-{tokens_in}-{tokens_out}-{cost}"
    reply = await Script("settle")(
        client, keys.settle_keys(k.kid, ident), (tokens_in, tokens_out, cost, tpm, tpd, 60, 90)
    )
    now = await now_ms(client)
    used = tokens_in + tokens_out
    want, writes = settle_record(record, used, cost)
    assert [int(v) for v in reply] == want, f"settle.lua answered {reply} for record={record}"
    after = text_fields(await client.hgetall(k.record))
    assert after == {**record, **writes}, f"settle.lua wrote {after} over {record}"
    for name, cap, window in (("tm", tpm, 60_000), ("td", tpd, 86_400_000)):
        stored = text_fields(await client.hgetall(k.buckets[name]))
        if cap < 0:
            assert stored == states[name], "a bucket without a limit was charged"
            continue
        low, _ = level(states[name], cap, window, before, debt=True)
        high, _ = level(states[name], cap, window, now + SLACK_MS, debt=True)
        tokens = float(stored["tokens"])
        assert low - used - 1e-6 <= tokens <= high - used + 1e-6, (stored, states[name], cap)


def close(got: list[Any], want: list[Any]) -> bool:
    """Equal, except reset and retry times may differ by the clock slack."""
    if len(got) != len(want) or got[:2] != want[:2]:
        return False
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        slack = SLACK_MS + 1 if i in (5, 7, 8, 15, 17) else 0
        if abs(int(a) - int(b)) > slack if i >= 2 else a != b:
            return False
    return True


async def check_writes(
    client: Any, k: Key, record: dict[str, str], minute: dict[str, str], day: dict[str, str],
    reply: list[Any], charged: bool = True,
) -> None:  # fmt: skip
    """After an admission: both buckets one token lower than their level (`charged`; a
    shadowed admission leaves them as they were), the counters."""
    after = text_fields(await client.hgetall(k.record))
    requests = after.get("requests")
    old = record.get("requests")
    assert requests == (str(int(old) + 1) if old and old.isdigit() and len(old) <= 12 else "1")
    if reply[10] & 4:  # the key has a balance: charged the request price
        assert after.get("credits") == str(reply[9])
    if not charged:
        assert text_fields(await client.hgetall(k.minute)) == minute
        assert text_fields(await client.hgetall(k.day)) == day
        return
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
@example(schedule=TOKEN_DEBT)
def test_admit_lua_matches_the_reference_on_redis(
    redis_server: RedisServer, schedule: list[tuple[Any, ...]]
) -> None:
    run(lambda: redis.asyncio.Redis.from_url(redis_server.url), schedule)


@pytest.mark.slow
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=steps)
@example(schedule=TOKEN_DEBT)
def test_admit_lua_matches_the_reference_on_fakeredis(schedule: list[tuple[Any, ...]]) -> None:
    """Embedded mode: the same script on fakeredis's Lua gives the same answers."""
    run(connection.embedded, schedule)
