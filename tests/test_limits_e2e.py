"""Limiter correctness through real edge processes on a real Redis (T01-T07 in docs/testplan.md).

Bucket state is seeded with HSET (tokens, ts in Redis-time ms) instead of sleeping to a
wall-clock boundary; every test uses fresh keys.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import redis

from edge.keys import bucket_keys, new_kid, record_key
from edge.keys import make_key as build_key
from tests.support.edge_process import EdgeProcess, auth, edge_env
from tests.support.fake_upstream import FakeUpstream
from tests.support.metrics import scrape, value
from tests.support.monitor import CommandCounter
from tests.support.redis_server import RedisServer


def redis_ms(r: redis.Redis) -> int:
    sec, usec = r.time()
    return int(sec) * 1000 + int(usec) // 1000


def seed_minute(r: redis.Redis, kid: str, tokens: float, ts_offset_ms: int) -> None:
    """Put the minute bucket at `tokens`, last updated `ts_offset_ms` from Redis now."""
    minute, _ = bucket_keys(kid)
    r.hset(minute, mapping={"tokens": tokens, "ts": redis_ms(r) + ts_offset_ms})
    r.pexpire(minute, 3_600_000)


def statuses(url: str, key: str, n: int, path: str = "/v1/models") -> list[int]:
    with httpx.Client(base_url=url, headers=auth(key), timeout=10) as client:
        return [client.get(path).status_code for _ in range(n)]


def admitted_until_429(url: str, key: str, limit: int = 200) -> int:
    """Sequential requests until the first 429; how many got 200 before it."""
    with httpx.Client(base_url=url, headers=auth(key), timeout=10) as client:
        for i in range(limit):
            resp = client.get("/v1/models")
            if resp.status_code == 429:
                return i
            assert resp.status_code == 200, resp.text
    raise AssertionError(f"no 429 within {limit} requests")


async def burst(urls: list[str], key: str, per_process: int) -> Counter[int]:
    """`per_process` concurrent requests against each URL at once, 0-1 ms jitter each."""

    async def one(client: httpx.AsyncClient) -> int:
        await asyncio.sleep(random.random() / 1000)
        resp = await client.get("/v1/models")
        if resp.status_code == 429:
            assert resp.json()["error"]["code"] == "rate_limit_exceeded"
        return resp.status_code

    limits = httpx.Limits(max_connections=per_process, max_keepalive_connections=per_process)
    clients = [
        httpx.AsyncClient(base_url=u, headers=auth(key), limits=limits, timeout=20) for u in urls
    ]
    try:
        results = await asyncio.gather(*(one(c) for c in clients for _ in range(per_process)))
    finally:
        for c in clients:
            await c.aclose()
    return Counter(results)


@pytest.mark.multiproc
async def test_concurrency_exact_across_two_processes(
    spawn_edge, redis_server: RedisServer, upstream: FakeUpstream, make_key
) -> None:
    """T01: 2 processes x 100 concurrent requests on an rpm=20 key → exactly 20 admitted."""
    env = edge_env(redis_server.url, upstream.url, EDGE_LOG_LEVEL="info")
    a, b = spawn_edge(env, "a"), spawn_edge(env, "b")
    for _ in range(5):
        upstream.clear()
        key, _ = make_key("free", rpm=20, rpd=1000)
        counts = await burst([a.url, b.url], key, 100)
        assert counts == {200: 20, 429: 180}
        assert len(upstream.records) == 20


def test_both_buckets_checked_before_charge(edge: EdgeProcess, r: redis.Redis, make_key) -> None:
    """T02: the day bucket rejects without charging the minute bucket; storms charge nothing;
    bucket keys always carry a TTL."""
    key, rec = make_key("free", rpm=5, rpd=3)
    before = scrape(edge.url)
    assert statuses(edge.url, key, 3) == [200, 200, 200]
    with httpx.Client(base_url=edge.url, headers=auth(key)) as client:
        resp = client.get("/v1/models")
    assert resp.status_code == 429
    assert resp.json()["error"]["code"] == "rate_limit_exceeded"
    assert resp.headers["x-should-retry"] == "false"
    after = scrape(edge.url)
    label = {"plan": "free", "outcome": "rate_limited_day"}
    assert (
        value(after, "edge_requests_total", **label) - value(before, "edge_requests_total", **label)
        == 1
    )

    minute, day = bucket_keys(rec.id)
    assert math.floor(float(r.hget(minute, "tokens"))) == 2
    state = (r.hgetall(minute), r.hgetall(day))

    async def storm() -> Counter[int]:
        return await burst([edge.url], key, 50)

    assert asyncio.run(storm()) == {429: 50}
    assert (r.hgetall(minute), r.hgetall(day)) == state
    assert r.pttl(minute) > 0 and r.pttl(day) > 0


def test_refill_deterministic_by_state_rewind(edge: EdgeProcess, r: redis.Redis, make_key) -> None:
    """T03: continuous refill; rewinds give exactly the refilled tokens, capped at capacity."""
    key, rec = make_key("free", rpm=60, rpd=100_000)
    seed_minute(r, rec.id, 0, -10_000)
    assert admitted_until_429(edge.url, key) == 10

    seed_minute(r, rec.id, 0, -3_600_000)
    assert admitted_until_429(edge.url, key) == 60

    # A timestamp 60 s in the future (clock stepped back at a failover): no error, no negative
    # tokens, no refill until Redis time passes it.
    minute, _ = bucket_keys(rec.id)
    seed_minute(r, rec.id, 0, 60_000)
    with httpx.Client(base_url=edge.url, headers=auth(key)) as client:
        resp = client.get("/v1/models")
    assert resp.status_code == 429
    assert 60 <= int(resp.headers["retry-after"]) <= 62
    assert float(r.hget(minute, "tokens")) >= 0

    # ... and admission resumes at the normal rate once Redis time has passed it: 0.5 tokens
    # stored 500 ms ahead hold exactly one whole token 1.0-1.9 s later.
    seed_minute(r, rec.id, 0.5, 500)
    time.sleep(1.2)
    assert admitted_until_429(edge.url, key) == 1
    assert float(r.hget(minute, "tokens")) >= 0


def test_refill_in_real_time(edge: EdgeProcess, r: redis.Redis, make_key) -> None:
    """T03, the one real-time check: rpm=600 refills 10 tokens a second."""
    key, rec = make_key("free", rpm=600, rpd=100_000)
    seed_minute(r, rec.id, 0, 0)
    started = time.monotonic()
    time.sleep(1.0)
    got = Counter(statuses(edge.url, key, 15))
    elapsed = time.monotonic() - started  # the requests themselves take time: tokens accrue
    assert 9 <= got[200] <= int(10 * elapsed) + 1, (got, elapsed)
    if elapsed < 1.4:
        assert got[429] > 0


def _fresh_buckets(r: redis.Redis, kid: str) -> None:
    r.delete(*bucket_keys(kid))


def _assert_integer_headers(resp: httpx.Response) -> None:
    assert "set-cookie" not in resp.headers
    for name in ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests"):
        assert re.fullmatch(r"\d+", resp.headers[name]), resp.headers[name]
    for item in resp.headers["ratelimit"].split(","):
        assert re.fullmatch(r'\s*"(minute|day)";r=\d+;t=\d+', item), item


@pytest.mark.parametrize(
    "garbage", ["abc", "-1", "1e309", "", "0x10", " 5", "5.5", "5\r\nSet-Cookie: x=1", "9" * 20]
)
def test_garbage_limit_fields_fall_back_to_the_plan(
    edge: EdgeProcess, r: redis.Redis, make_key, garbage: str
) -> None:
    """T05: any non-integer override is ignored (plan value used); never a 500 or injection."""
    key, rec = make_key("free")
    r.hset(record_key(rec.id), mapping={"rpm": garbage, "rpd": garbage})
    with httpx.Client(base_url=edge.url, headers=auth(key)) as client:
        resp = client.get("/v1/models")
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-ratelimit-limit-requests"] == "20"
    assert resp.headers["ratelimit-policy"] == '"minute";q=20;w=60, "day";q=1000;w=86400'
    _assert_integer_headers(resp)


def test_live_overrides(edge: EdgeProcess, r: redis.Redis, make_key) -> None:
    """T05: operator edits with redis-cli apply on the very next request."""
    key, rec = make_key("free")
    assert statuses(edge.url, key, 2) == [200, 200]
    r.hset(record_key(rec.id), "rpm", "3")  # 18 tokens left; capacity now 3
    assert admitted_until_429(edge.url, key) == 3

    r.hset(record_key(rec.id), "rpm", "0")
    _fresh_buckets(r, rec.id)
    with httpx.Client(base_url=edge.url, headers=auth(key)) as client:
        for _ in range(3):
            resp = client.get("/v1/models")
            assert resp.status_code == 429
            assert int(resp.headers["retry-after"]) >= 1
            _assert_integer_headers(resp)

    r.hset(record_key(rec.id), mapping={"rpm": "", "rpd": "0"})
    _fresh_buckets(r, rec.id)
    with httpx.Client(base_url=edge.url, headers=auth(key)) as client:
        resp = client.get("/v1/models")
    assert resp.status_code == 429 and resp.headers["x-should-retry"] == "false"

    r.hset(record_key(rec.id), "rpd", "-5")  # garbage: back to the plan's 1000/day
    assert statuses(edge.url, key, 1) == [200]


def test_garbage_bucket_and_record_fields(edge: EdgeProcess, r: redis.Redis, make_key) -> None:
    """T05: broken bucket state counts as a fresh bucket; broken status, expiry or plan give
    defined JSON answers."""
    key, rec = make_key("free")
    minute, day = bucket_keys(rec.id)
    r.hset(minute, mapping={"tokens": "abc", "ts": "xyz"})
    r.hset(day, mapping={"tokens": "nan", "ts": "1e309"})
    assert statuses(edge.url, key, 1) == [200]
    assert 0 <= float(r.hget(minute, "tokens")) <= 20

    cases = [
        ({"status": "Active?"}, 403, "insufficient_permissions"),
        ({"status": "active", "expires": "soon"}, 401, "invalid_api_key"),
        ({"expires": "", "plan": "platinum"}, 503, "config_error"),
        ({"plan": "free"}, 200, None),
    ]
    with httpx.Client(base_url=edge.url, headers=auth(key)) as client:
        for fields, status, code in cases:
            r.hset(record_key(rec.id), mapping=fields)
            resp = client.get("/v1/models")
            assert resp.status_code == status, (fields, resp.text)
            if code:
                assert resp.headers["content-type"] == "application/json"
                assert resp.json()["error"]["code"] == code


def _ratelimit_items(header: str) -> dict[str, dict[str, int]]:
    items = {}
    for item in header.split(","):
        name, *params = item.strip().split(";")
        items[name.strip('"')] = {k: int(v) for k, v in (p.split("=") for p in params)}
    return items


def test_rate_limit_headers_and_retry_after(edge: EdgeProcess, r: redis.Redis, make_key) -> None:
    """T06: remaining counts down truthfully, the IETF fields agree, Retry-After is honest."""
    key, _ = make_key("free", rpm=6, rpd=500)
    remaining = []
    with httpx.Client(base_url=edge.url, headers=auth(key)) as client:
        for _ in range(7):
            resp = client.get("/v1/models")
            remaining.append(int(resp.headers["x-ratelimit-remaining-requests"]))
            assert resp.headers["x-ratelimit-limit-requests"] == "6"
            policy = _ratelimit_items(resp.headers["ratelimit-policy"])
            assert policy == {"minute": {"q": 6, "w": 60}, "day": {"q": 500, "w": 86400}}
            state = _ratelimit_items(resp.headers["ratelimit"])
            assert state["minute"]["r"] == remaining[-1]
            assert 0 < state["minute"]["t"] <= 60 and 0 < state["day"]["t"] <= 86400
    assert remaining == [5, 4, 3, 2, 1, 0, 0]
    assert resp.status_code == 429
    assert int(resp.headers["retry-after"]) >= 1
    assert "x-should-retry" not in resp.headers

    # Retry-After is enough: rpm=60 refills one token a second.
    key, rec = make_key("free", rpm=60, rpd=500)
    seed_minute(r, rec.id, 0, 0)
    with httpx.Client(base_url=edge.url, headers=auth(key)) as client:
        resp = client.get("/v1/models")
        assert resp.status_code == 429
        wait = int(resp.headers["retry-after"])
        assert wait == 1
        time.sleep(wait)
        assert client.get("/v1/models").status_code == 200


def test_one_redis_command_per_request(
    edge: EdgeProcess, redis_server: RedisServer, r: redis.Redis, make_key
) -> None:
    """T07: one Redis command per admitted or rejected request; none for a malformed key."""
    key, _ = make_key("free", rpm=3, rpd=100)
    paused, paused_rec = make_key("free")
    r.hset(record_key(paused_rec.id), "status", "paused")
    unknown = make_key_string()
    with httpx.Client(base_url=edge.url, timeout=10) as client:
        client.get("/v1/models", headers=auth(key))  # warm the connection pool
        cases = [
            (key, 200),
            (key, 200),
            (key, 429),
            (unknown, 401),
            (paused, 403),
        ]
        for presented, status in cases:
            with CommandCounter(redis_server.port) as counter:
                assert client.get("/v1/models", headers=auth(presented)).status_code == status
            assert counter.commands == ["EVALSHA"], (status, counter.commands)

        malformed = [
            "sk-" + key[3:],  # prefix
            key[:-1],  # length
            key[:10] + "-" + key[11:],  # alphabet
            key[:-1] + ("A" if key[-1] != "A" else "B"),  # checksum
        ]
        with CommandCounter(redis_server.port) as counter:
            for bad in malformed:
                assert client.get("/v1/models", headers=auth(bad)).status_code == 401
            assert client.get("/v1/models").status_code == 401
        assert counter.commands == []


def make_key_string() -> str:
    """A well-formed key (valid checksum) that was never created."""
    return build_key("gw_sk_", new_kid())


@pytest.mark.parametrize(
    "fields",
    [
        {"requests": "notanumber"},
        {"requests": "9" * 30},
        {"requests": "-1"},
        {"last_used": "yesterday"},
        {"prev_hash": "x", "prev_until": "later"},
        {"rotated": "\r\nSet-Cookie: x=1"},
    ],
)
def test_garbage_never_errors_after_a_charge(
    edge: EdgeProcess, r: redis.Redis, make_key, fields: dict[str, str]
) -> None:
    """T05: admit.lua validates every field before its first write. An operator's garbage in
    `requests` used to make every request 503 while the minute bucket was still charged."""
    key, rec = make_key("free")
    r.hset(record_key(rec.id), mapping=fields)
    minute, _ = bucket_keys(rec.id)
    assert statuses(edge.url, key, 3) == [200, 200, 200]
    tokens = float(r.hget(minute, "tokens") or 0)
    assert 16.9 < tokens <= 17.01  # exactly three charged (plus a hair of refill)
    count = r.hget(record_key(rec.id), "requests")
    if "requests" in fields:
        assert count == b"3"  # reset from garbage to 1, then counted on


def test_wrong_type_bucket_charges_nothing(edge: EdgeProcess, r: redis.Redis, make_key) -> None:
    """A bucket key that is not a hash fails the script before any write: a 503, and the other
    bucket untouched."""
    key, rec = make_key("free")
    minute, day = bucket_keys(rec.id)
    r.set(day, "not a hash")
    resp = httpx.get(f"{edge.url}/v1/models", headers=auth(key))
    assert resp.status_code == 503
    assert resp.json()["error"]["type"] == "service_unavailable"
    assert r.exists(minute) == 0
    r.delete(day)
    assert statuses(edge.url, key, 1) == [200]


FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
HAVE_FAKETIME = FAKETIME_LIB.exists()


@pytest.mark.multiproc
async def test_clock_skew_between_instances(
    spawn_edge, redis_server: RedisServer, upstream: FakeUpstream, make_key
) -> None:
    """T04: instance A's clock is an hour ahead, B's an hour behind (libfaketime shifts their
    time.time()); they still admit exactly 20 of 200 and agree on Retry-After, because edge
    takes time only from Redis."""
    if not HAVE_FAKETIME:
        pytest.fail("faketime is not installed: make test installs it (scripts/ensure-packages.sh)")

    def skewed(offset: str) -> dict[str, str]:
        return edge_env(
            redis_server.url,
            upstream.url,
            EDGE_LOG_LEVEL="info",
            LD_PRELOAD=str(FAKETIME_LIB),
            FAKETIME=offset,
            FAKETIME_DONT_FAKE_MONOTONIC="1",
        )

    ahead, behind = spawn_edge(skewed("+3600"), "ahead"), spawn_edge(skewed("-3600"), "behind")
    for proc, offset in ((ahead, 3600), (behind, -3600)):  # the skew is real: see their logs
        stamp = datetime.strptime(proc.log()[:19], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
        assert abs(stamp.timestamp() - time.time() - offset) < 120
    key, _ = make_key("free", rpm=20, rpd=1000)
    counts = await burst([ahead.url, behind.url], key, 100)
    assert counts == {200: 20, 429: 180}
    assert len(upstream.records) == 20
    waits = []
    async with httpx.AsyncClient(headers=auth(key), timeout=10) as client:
        answers = [await client.get(f"{proc.url}/v1/models") for proc in (ahead, behind)]
    for resp in answers:
        assert resp.status_code == 429
        waits.append(int(resp.headers["retry-after"]))
        assert resp.headers["x-ratelimit-remaining-requests"] == "0"
    assert abs(waits[0] - waits[1]) <= 1
    assert all(1 <= w <= 4 for w in waits)  # rpm=20: a token every 3 s
