"""Per-key usage history through real edge processes, a real redis-server and the fake upstream.

The scripts on the request path (admit.lua, settle.lua, refund.lua) count every answer to an
authenticated key in a hash per UTC day and per UTC hour of Redis time, beside the key's record
(`edge:key:{kid}:day:YYYY-MM-DD`, `…:hour:YYYY-MM-DDTHH`); the admin API
(`/admin/keys/{id}/usage`, `/admin/usage`, `/admin/usage/top`) and `edge keys usage` read them.
Checked here, each with real numbers:

- counts are exact across two instances under a concurrent burst: requests == the 200s,
  rate_limited == the 429s, in the hour row and the day row that hold them;
- the key's other refusals after it authenticated count as `rejected` (paused, revoked,
  expired, plan not configured, out of credits, route or model outside the scopes, a body with
  no usable model); a wrong secret and an unknown key count nowhere;
- metered keys: the settled tokens and the credits charged (the request price plus the token
  cost, as the record's balance fell), a refund taking the price back off;
- days roll over at UTC midnight of Redis time (a redis-server under libfaketime);
- retention: day hashes expire at the day's end + `usage.retention_days`, hours 48 h after;
- sums by owner, the busiest keys of a day, the previous secret's use during a rotation grace;
- an unmetered key still costs one Redis command per request, the history written inside it;
- garbage in a usage hash is reset by the next count, a key of another type left alone;
- a 3-master Redis Cluster (usage keys in the record's slot) and the embedded mode;
- the validation matrix of the usage endpoints and the CLI's table, --json and --hours.

The machine's clock may cross an hour or UTC midnight while a test runs: totals are compared
over ranges that hold both sides (yesterday and today, from Redis TIME), and a row is pinned to
the periods holding the Redis times read before and after the requests. Only the faketime test
controls the clock. Fresh keys per test; Redis is never flushed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import secrets
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
import redis

from edge.control.records import KeyRecord
from edge.keys import make_key as forge_key
from edge.keys import new_kid, record_key, usage_day_key, usage_hour_key
from tests.support.edge_process import EdgeProcess, auth, edge_env, run_cli
from tests.support.fake_upstream import FakeUpstream
from tests.support.keys import new_key
from tests.support.monitor import CommandCounter
from tests.support.ports import free_port
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

MakeKey = Callable[..., tuple[str, KeyRecord]]
SpawnEdge = Callable[..., EdgeProcess]

ADMIN_TOKEN = f"usage-admin-{secrets.token_hex(12)}"
PREFIX = "gw_sk_"
FIELDS = ("requests", "rate_limited", "rejected", "input_tokens", "output_tokens", "credits")
PRICES = [{"match": "unit-*", "input": 1_000_000, "output": 2_000_000}]  # 1 and 2 credits a token
SETTLED = 5.0  # seconds a background settlement may take to show in Redis

FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
# redis-server is linked with jemalloc, which calls clock_gettime() while it initializes, before
# libfaketime has: libfaketime then gives up ("Unexpected recursive calls to clock_gettime()",
# libfaketime#130) and redis-server never starts. Preloading glibc's malloc-debug library first
# gives redis-server glibc's malloc, and libfaketime initializes undisturbed.
GLIBC_MALLOC = Path("/lib/x86_64-linux-gnu/libc_malloc_debug.so.0")
MIDNIGHT = int(datetime(2027, 1, 1, tzinfo=UTC).timestamp())


# Processes.


def usage_env(redis_url: str, upstream_url: str, **extra: str) -> dict[str, str]:
    """edge with the admin API on and token prices (`unit-*`), as in the metering tests."""
    return edge_env(
        redis_url,
        upstream_url,
        EDGE_ADMIN_TOKEN=ADMIN_TOKEN,
        EDGE_PRICING_MODELS=json.dumps(PRICES),
        EDGE_LOG_LEVEL="info",
        **extra,
    )


class Pair(NamedTuple):
    a: EdgeProcess
    b: EdgeProcess


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    fake_upstream_server: FakeUpstream,
) -> Iterator[Pair]:
    """Two edge processes on the session Redis, admin API on, default retention (90 days)."""
    log_dir = tmp_path_factory.mktemp("usage")
    env = usage_env(redis_server.url, fake_upstream_server.url)
    procs: list[EdgeProcess] = []
    try:
        for name in ("usage-a", "usage-b"):
            procs.append(EdgeProcess(log_dir, env, name).start())
        yield Pair(*procs)
    finally:
        for proc in procs:
            proc.stop()


def admin(proc: EdgeProcess, token: str = ADMIN_TOKEN) -> httpx.Client:
    return httpx.Client(base_url=f"{proc.url}/admin", headers=auth(token), timeout=10)


# Redis time.


def redis_time(client: redis.Redis) -> int:
    """Unix seconds by Redis's clock: the one the scripts count by."""
    seconds, _ = client.time()
    return int(seconds)


def utc(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def day_of(seconds: int) -> str:
    return utc(seconds).strftime("%Y-%m-%d")


def hour_of(seconds: int) -> str:
    return utc(seconds).strftime("%Y-%m-%dT%H")


def label(seconds: int, unit: int) -> str:
    """The `start` of the row (day: unit 86400, hour: 3600) holding Redis time `seconds`."""
    return utc(seconds - seconds % unit).strftime("%Y-%m-%dT%H:%M:%SZ")


def days_around(client: redis.Redis) -> dict[str, str]:
    """`from` yesterday `to` today (Redis time, read now): a range that holds requests made in
    the last seconds even if UTC midnight passed meanwhile."""
    today = utc(redis_time(client)).date()
    return {"from": (today - timedelta(days=1)).isoformat(), "to": today.isoformat()}


# Usage as the API and Redis show it.


def counts(**given: int) -> dict[str, int]:
    """A totals row: the six fields, zero unless given."""
    unknown = set(given) - set(FIELDS)
    assert not unknown, unknown
    return {name: given.get(name, 0) for name in FIELDS}


ZERO = counts()


def added(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {name: sum(row[name] for row in rows) for name in FIELDS}


def busy(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows where anything was counted."""
    return [row for row in rows if any(row[name] for name in FIELDS)]


def answer(resp: httpx.Response, status: int) -> Any:
    assert resp.status_code == status, (resp.request.method, resp.request.url, resp.text)
    assert resp.headers["content-type"] == "application/json", resp.headers
    return resp.json()


def key_usage(api: httpx.Client, kid: str, **params: str) -> dict[str, Any]:
    body = answer(api.get(f"/keys/{kid}/usage", params=params), 200)
    assert body["key"] == kid
    assert body["object"] == "list"
    assert body["totals"] == added(body["data"])
    return body  # type: ignore[no-any-return]


def totals(api: httpx.Client, client: redis.Redis, kid: str) -> dict[str, int]:
    """The key's totals from yesterday to today (Redis time)."""
    return key_usage(api, kid, **days_around(client))["totals"]  # type: ignore[no-any-return]


def assert_periods(body: dict[str, Any], expected: dict[str, int], first: int, last: int) -> None:
    """The rows of a usage answer that saw anything are the rows (day or hour) holding Redis
    times `first` to `last` (one row, or two if a boundary passed), and they add up to
    `expected`, as do the totals."""
    unit = 3600 if body["granularity"] == "hour" else 86400
    assert last - first < unit
    holding = {label(first, unit), label(last, unit)}
    seen = busy(body["data"])
    assert {row["start"] for row in seen} <= holding, (seen, holding)
    assert added(seen) == expected
    assert body["totals"] == expected
    if len(holding) == 1:
        assert len(seen) == 1


def stored(client: redis.Redis, name: str) -> dict[str, int]:
    """A usage hash as the scripts wrote it (fields missing: 0)."""
    raw: dict[bytes, bytes] = client.hgetall(name)  # type: ignore[assignment]
    fields = {k.decode(): int(v) for k, v in raw.items()}
    assert set(fields) <= set(FIELDS), fields
    return {name: fields.get(name, 0) for name in FIELDS}


def usage_names(client: redis.Redis, kid: str) -> list[str]:
    """Every usage key of `kid` in Redis (day and hour)."""
    names = [n.decode() for n in client.scan_iter(match=f"{record_key(kid)}:*", count=1000)]
    return sorted(n for n in names if ":day:" in n or ":hour:" in n)


def stored_sum(client: redis.Redis, kid: str, kind: str) -> dict[str, int]:
    """The key's usage hashes of one kind ("day" or "hour") added up."""
    names = [n for n in usage_names(client, kid) if f":{kind}:" in n]
    return added([stored(client, n) for n in names])


# Requests.


def get(url: str, key: str, path: str = "/v1/models") -> int:
    return httpx.get(url + path, headers=auth(key), timeout=10).status_code


def chat_body(model: str | None = "unit-1") -> bytes:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "how many tokens is this"}]}
    if model is not None:
        body["model"] = model
    return json.dumps(body).encode()


def post(url: str, key: str, body: bytes, path: str = "/v1/chat/completions") -> httpx.Response:
    headers = auth(key, **{"Content-Type": "application/json"})
    return httpx.post(url + path, headers=headers, content=body, timeout=10)


def record_int(client: redis.Redis, kid: str, name: str) -> int | None:
    value = client.hget(record_key(kid), name)
    return None if value is None else int(value)


# 1. Exact counts across two instances.


@pytest.mark.multiproc
async def test_counts_are_exact_across_two_instances(
    pair: Pair, make_key: MakeKey, r: redis.Redis, upstream: FakeUpstream
) -> None:
    """40 concurrent requests over two instances on an rpm=10 key: the usage says requests ==
    the 200s and rate_limited == the 429s, in the totals, the hour row and the day row that
    hold them, and in the hashes in Redis."""
    key, rec = make_key("free", rpm=10, rpd=1000)
    first = redis_time(r)
    async with httpx.AsyncClient(headers=auth(key), timeout=20) as client:
        answers = await asyncio.gather(
            *(client.get(f"{pair[i % 2].url}/v1/models") for i in range(40))
        )
    last = redis_time(r)
    outcome = Counter(resp.status_code for resp in answers)
    assert outcome == {200: 10, 429: 30}
    assert len(upstream.records) == 10
    expected = counts(requests=outcome[200], rate_limited=outcome[429])
    with admin(pair.b) as api:
        for granularity in ("day", "hour"):
            body = key_usage(api, rec.id, granularity=granularity, **days_around(r))
            assert body["granularity"] == granularity
            assert_periods(body, expected, first, last)
        assert answer(api.get(f"/keys/{rec.id}"), 200)["requests"] == 10
    assert stored_sum(r, rec.id, "day") == expected
    assert stored_sum(r, rec.id, "hour") == expected
    for name in usage_names(r, rec.id):
        assert re.fullmatch(
            re.escape(record_key(rec.id)) + r":(day:\d{4}-\d\d-\d\d|hour:\d{4}-\d\d-\d\dT\d\d)",
            name,
        ), name
    assert {day_of(first), day_of(last)} >= {
        n.rsplit(":", 1)[1] for n in usage_names(r, rec.id) if ":day:" in n
    }


# 2. Rejections.


def test_refusals_after_authentication_count_as_rejected(
    pair: Pair, make_key: MakeKey, r: redis.Redis
) -> None:
    """Each of the key's own refusals is one `rejected` (never `requests`); what was admitted
    beside them is counted as requests; a token-bucket 429 is `rate_limited`."""
    url = pair.a.url
    cases: list[tuple[str, str, list[int], dict[str, int]]] = []
    with admin(pair.a) as api:
        key, rec = make_key("free")
        answer(api.post(f"/keys/{rec.id}/pause"), 200)
        cases.append(("paused", rec.id, [get(url, key), get(url, key)], counts(rejected=2)))

        key, rec = make_key("free")
        answer(api.post(f"/keys/{rec.id}/revoke"), 200)
        cases.append(("revoked", rec.id, [get(url, key)], counts(rejected=1)))

    key, rec = make_key("free")
    r.hset(record_key(rec.id), "expires", redis_time(r) - 10)
    cases.append(("expired", rec.id, [get(url, key)], counts(rejected=1)))

    key, rec = make_key("free")
    r.hset(record_key(rec.id), "plan", "platinum")
    cases.append(("plan not configured", rec.id, [get(url, key)], counts(rejected=1)))

    key, rec = make_key("free", credits=0)
    cases.append(("no credits", rec.id, [get(url, key), get(url, key)], counts(rejected=2)))

    key, rec = make_key("free", credits=1)
    statuses = [get(url, key), get(url, key)]  # the one credit buys one request (price 1)
    cases.append(("last credit", rec.id, statuses, counts(requests=1, rejected=1, credits=1)))

    key, rec = make_key("free", scopes={"routes": ["embeddings"]})
    embedding = post(
        url, key, json.dumps({"model": "e", "input": "a b"}).encode(), "/v1/embeddings"
    )
    statuses = [get(url, key), embedding.status_code]
    cases.append(("route scope", rec.id, statuses, counts(requests=1, rejected=1)))

    key, rec = make_key("free", scopes={"models": ["unit-*"]})
    statuses = [post(url, key, chat_body(m)).status_code for m in ("other-1", None, "unit-1")]
    cases.append(("model scope", rec.id, statuses, counts(requests=1, rejected=2)))

    key, rec = make_key("pro", tpm=1000)
    tokens = record_key(rec.id) + ":tm"
    sec, usec = r.time()
    r.hset(tokens, mapping={"tokens": -500, "ts": int(sec) * 1000 + int(usec) // 1000})
    r.pexpire(tokens, 3_600_000)
    cases.append(("tokens in debt", rec.id, [get(url, key)], counts(rate_limited=1)))

    expected_statuses = {
        "paused": [403, 403],
        "revoked": [401],
        "expired": [401],
        "plan not configured": [503],
        "no credits": [402, 402],
        "last credit": [200, 402],
        "route scope": [403, 200],
        "model scope": [403, 400, 200],
        "tokens in debt": [429],
    }
    with admin(pair.b) as api:
        for name, kid, got, expected in cases:
            assert got == expected_statuses[name], name
            assert totals(api, r, kid) == expected, name
            assert stored_sum(r, kid, "day") == expected, name
            assert stored_sum(r, kid, "hour") == expected, name


def test_a_wrong_secret_or_an_unknown_key_counts_nowhere(
    pair: Pair, make_key: MakeKey, r: redis.Redis
) -> None:
    """A forged key for a real key id (right format, wrong secret) and a key id never issued get
    401 and leave no trace: the real key's usage holds only its own requests, the unknown id
    has no usage key at all."""
    key, rec = make_key("free")
    assert [get(pair.a.url, key), get(pair.b.url, key)] == [200, 200]
    forged = forge_key(PREFIX, rec.id)
    assert forged != key
    unknown_kid = new_kid()
    unknown = forge_key(PREFIX, unknown_kid)
    for presented in (forged, forged, forged, unknown, unknown):
        resp = httpx.get(f"{pair.a.url}/v1/models", headers=auth(presented), timeout=10)
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key"
    with admin(pair.a) as api:
        assert totals(api, r, rec.id) == counts(requests=2)
        shown = answer(api.get(f"/keys/{rec.id}"), 200)
        assert (shown["requests"], shown["previous_key_requests"]) == (2, 0)
        answer(api.get(f"/keys/{unknown_kid}/usage"), 404)
    assert stored_sum(r, rec.id, "day") == counts(requests=2)
    assert list(r.scan_iter(match=f"{record_key(unknown_kid)}*", count=1000)) == []


# 3. Metered usage.


def settled_tokens(client: redis.Redis, kid: str, tokens: int) -> None:
    """Wait for the background settlement to record `tokens` on the key (exactly)."""
    assert wait_until(lambda: (record_int(client, kid, "tokens") or 0) >= tokens, SETTLED)
    assert record_int(client, kid, "tokens") == tokens


def usage_of(resp: httpx.Response) -> tuple[int, int]:
    assert resp.status_code == 200, resp.text
    usage = resp.json()["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"]


def test_metered_usage_holds_the_tokens_and_the_credits_charged(
    pair: Pair,
    spawn_edge: SpawnEdge,
    redis_server: RedisServer,
    make_key: MakeKey,
    r: redis.Redis,
) -> None:
    """A key with a balance and token prices: after settlement the usage holds the upstream's
    reported tokens and `credits` == the request price + the token cost == what the balance
    fell by. A request the upstream never got (closed port) counts as a request, its price
    refunded: credits net 0. A token limit without a balance: tokens, no credits. An unmetered
    key is never settled: requests only."""
    key, rec = make_key("pro", credits=10_000)
    p, c = usage_of(post(pair.a.url, key, chat_body("unit-1")))
    assert p > 0 and c > 0
    settled_tokens(r, rec.id, p + c)
    spent = 10_000 - (record_int(r, rec.id, "credits") or 0)
    assert spent == 1 + p + 2 * c  # the request price, then 1 and 2 credits a token
    expected = counts(requests=1, input_tokens=p, output_tokens=c, credits=spent)
    with admin(pair.a) as api:
        assert totals(api, r, rec.id) == expected
        assert stored_sum(r, rec.id, "hour") == expected

        closed_url = f"http://127.0.0.1:{free_port()}/v1"
        closed = spawn_edge(usage_env(redis_server.url, closed_url), name="closed-upstream")
        assert post(closed.url, key, chat_body("unit-1")).status_code == 502
        assert record_int(r, rec.id, "credits") == 10_000 - spent  # the price given back
        assert totals(api, r, rec.id) == {**expected, "requests": 2}
        assert stored_sum(r, rec.id, "day") == {**expected, "requests": 2}

        limited_key, limited = make_key("pro", tpm=1_000_000)
        p2, c2 = usage_of(post(pair.b.url, limited_key, chat_body("unit-2")))
        settled_tokens(r, limited.id, p2 + c2)
        tokens_only = counts(requests=1, input_tokens=p2, output_tokens=c2)
        assert totals(api, r, limited.id) == tokens_only

        plain_key, plain = make_key("pro")
        usage_of(post(pair.b.url, plain_key, chat_body("unit-3")))
        assert totals(api, r, plain.id) == counts(requests=1)


# 4. UTC midnight by Redis time.


def faketime_redis(directory: Path, clock: Path) -> RedisServer:
    """A redis-server whose clock libfaketime takes from `clock` (re-read on every call), so a
    test can set it and let it run."""
    if not FAKETIME_LIB.exists():
        pytest.fail("faketime is not installed: make test installs it (scripts/ensure-packages.sh)")
    if not GLIBC_MALLOC.exists():
        pytest.fail(f"{GLIBC_MALLOC} is missing: libfaketime cannot run redis-server without it")
    clock.write_text("+0\n")
    env = {
        "LD_PRELOAD": f"{GLIBC_MALLOC} {FAKETIME_LIB}",
        "FAKETIME_TIMESTAMP_FILE": str(clock),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "TZ": "UTC",
    }
    return RedisServer(directory, env=env).start()


def set_clock(clock: Path, client: redis.Redis, at: int) -> None:
    """Make Redis's clock read `at` now, and run on from there."""
    offset = at - redis_time(client) + int(clock.read_text().strip() or "+0")
    clock.write_text(f"{offset:+d}\n")
    assert abs(redis_time(client) - at) <= 1


def test_days_roll_over_at_utc_midnight_by_redis_time(
    tmp_path: Path, spawn_edge: SpawnEdge, upstream: FakeUpstream
) -> None:
    """Redis's clock (libfaketime) runs from 2026-12-31 23:59:58 across midnight while edge's
    runs as it is: requests before midnight land in the 2026-12-31 day and 23:00 hour, those
    after in 2027-01-01 and 00:00; the API shows both days and both hours; the day hash
    expires 90 days after its own day's end."""
    server = faketime_redis(tmp_path / "faketime-redis", tmp_path / "clock")
    client = server.client()
    try:
        proc = spawn_edge(usage_env(server.url, upstream.url), name="faketime")
        key, rec = new_key(server.url, "free")
        set_clock(tmp_path / "clock", client, MIDNIGHT - 2)
        before = [get(proc.url, key) for _ in range(3)]
        assert redis_time(client) < MIDNIGHT, "3 requests took Redis's clock past midnight"
        assert wait_until(lambda: redis_time(client) >= MIDNIGHT, 5)
        after = [get(proc.url, key) for _ in range(2)]
        assert before + after == [200] * 5

        old_day, new_day = usage_day_key(rec.id, "2026-12-31"), usage_day_key(rec.id, "2027-01-01")
        old_hour = usage_hour_key(rec.id, "2026-12-31T23")
        new_hour = usage_hour_key(rec.id, "2027-01-01T00")
        assert usage_names(client, rec.id) == sorted([old_day, new_day, old_hour, new_hour])
        assert stored(client, old_day) == stored(client, old_hour) == counts(requests=3)
        assert stored(client, new_day) == stored(client, new_hour) == counts(requests=2)
        assert client.expiretime(old_day) == MIDNIGHT + 90 * 86400
        assert client.expiretime(new_day) == MIDNIGHT + 86400 + 90 * 86400
        assert client.expiretime(old_hour) == MIDNIGHT + 48 * 3600
        assert client.expiretime(new_hour) == MIDNIGHT + 3600 + 48 * 3600

        with admin(proc) as api:
            days = key_usage(api, rec.id, **{"from": "2026-12-31", "to": "2027-01-01"})
            assert (days["from"], days["to"], days["granularity"]) == (
                "2026-12-31",
                "2027-01-01",
                "day",
            )
            assert [(row["start"], row["requests"]) for row in days["data"]] == [
                ("2026-12-31T00:00:00Z", 3),
                ("2027-01-01T00:00:00Z", 2),
            ]
            hours = key_usage(
                api, rec.id, **{"from": "2026-12-31", "to": "2027-01-01", "granularity": "hour"}
            )
            assert len(hours["data"]) == 48
            assert [(row["start"], row["requests"]) for row in busy(hours["data"])] == [
                ("2026-12-31T23:00:00Z", 3),
                ("2027-01-01T00:00:00Z", 2),
            ]
            # the defaults follow Redis's today, not the machine's
            default = key_usage(api, rec.id)
            assert (default["from"], default["to"]) == ("2026-12-03", "2027-01-01")
            assert default["totals"] == counts(requests=5)
            default_hours = key_usage(api, rec.id, granularity="hour")
            assert (default_hours["from"], default_hours["to"]) == ("2026-12-31", "2027-01-01")
    finally:
        client.close()
        server.stop()


# 5. Retention.


def test_usage_hashes_expire_after_the_retention(
    pair: Pair,
    spawn_edge: SpawnEdge,
    redis_server: RedisServer,
    upstream: FakeUpstream,
    make_key: MakeKey,
    r: redis.Redis,
) -> None:
    """`EDGE_USAGE_RETENTION_DAYS=1`: the day hash expires one day after its day's end, the
    hour hash 48 hours after its hour's end; by default 90 days. A retention of 0 is refused at
    start-up."""
    short = spawn_edge(
        usage_env(redis_server.url, upstream.url, EDGE_USAGE_RETENTION_DAYS="1"), name="keep-1"
    )
    for proc, days in ((short, 1), (pair.a, 90)):
        key, rec = make_key("free")
        first = redis_time(r)
        assert get(proc.url, key) == 200
        last = redis_time(r)
        names = usage_names(r, rec.id)
        assert len(names) == 2, names
        [day_name] = [n for n in names if ":day:" in n]
        [hour_name] = [n for n in names if ":hour:" in n]
        assert day_name in {usage_day_key(rec.id, day_of(t)) for t in (first, last)}
        assert hour_name in {usage_hour_key(rec.id, hour_of(t)) for t in (first, last)}
        day_start = int(datetime.fromisoformat(day_name.rsplit(":", 1)[1] + "+00:00").timestamp())
        hour_start = int(
            datetime.strptime(hour_name.rsplit(":", 1)[1], "%Y-%m-%dT%H")
            .replace(tzinfo=UTC)
            .timestamp()
        )
        assert r.expiretime(day_name) == day_start + 86400 + days * 86400
        assert r.expiretime(hour_name) == hour_start + 3600 + 48 * 3600
        now = redis_time(r)
        day_ttl, hour_ttl = r.ttl(day_name), r.ttl(hour_name)
        to_day_end = day_start + 86400 - now
        assert 0 < day_ttl <= to_day_end + days * 86400, (days, day_ttl)
        assert day_ttl > (days - 1) * 86400
        assert 48 * 3600 - 2 <= hour_ttl <= 49 * 3600
    with pytest.raises(RuntimeError, match="retention_days"):
        spawn_edge(
            usage_env(redis_server.url, upstream.url, EDGE_USAGE_RETENTION_DAYS="0"), name="keep-0"
        )


# 6. Sums by owner, the busiest keys of a day.


def same_day(client: redis.Redis, action: Callable[[], Any]) -> tuple[Any, str]:
    """Run `action` (fresh keys each time) until it ran within one UTC day of Redis time: its
    result and that day (midnight passes at most once in a few seconds)."""
    for _ in range(3):
        first = redis_time(client)
        result = action()
        last = redis_time(client)
        if day_of(first) == day_of(last):
            return result, day_of(last)
    raise AssertionError("UTC midnight passed three times in a row")


def test_usage_summed_by_owner_and_the_busiest_keys(
    redis_factory: Callable[..., RedisServer], spawn_edge: SpawnEdge, upstream: FakeUpstream
) -> None:
    """Owner A's two keys (4 and 2 requests, one rejected) and owner B's (3 requests):
    /admin/usage?owner=A is exactly A's sum over 2 keys, without an owner at least A + B over
    every key; /admin/usage/top ranks the day's keys busiest first, at most `limit`. On a Redis
    of its own: the session's holds the whole suite's keys, busier ones among them."""
    own = redis_factory()
    proc = spawn_edge(usage_env(own.url, upstream.url), name="usage-top")
    r = own.client()

    def make_key(plan: str, **fields: Any) -> tuple[str, KeyRecord]:
        return new_key(own.url, plan, **fields)

    def scenario() -> tuple[str, str, list[KeyRecord]]:  # fresh owners and keys each try
        a, b = f"usage-a-{uuid.uuid4().hex[:8]}", f"usage-b-{uuid.uuid4().hex[:8]}"
        (busiest, busiest_rec), (quiet, quiet_rec) = (
            make_key("free", owner=a),
            make_key("free", owner=a),
        )
        other, other_rec = make_key("free", owner=b, name="the b key")
        for key, n in ((busiest, 4), (quiet, 2), (other, 3)):
            assert [get(proc.url, key) for _ in range(n)] == [200] * n
        r.hset(record_key(quiet_rec.id), "status", "paused")
        assert get(proc.url, quiet) == 403
        broke, broke_rec = make_key("free", credits=0)  # no owner: only in the global sum
        assert get(proc.url, broke) == 402
        _, idle_rec = make_key("free", owner=b)  # no answer at all: not in the top list
        return a, b, [busiest_rec, quiet_rec, other_rec, broke_rec, idle_rec]

    (a, b, (busiest, quiet, other, broke, idle)), day = same_day(r, scenario)
    span = days_around(r)
    a_sum = counts(requests=6, rejected=1)
    with admin(proc) as api:
        by_a = answer(api.get("/usage", params={"owner": a, **span}), 200)
        assert (by_a["owner"], by_a["keys"], by_a["object"]) == (a, 2, "list")
        assert (by_a["from"], by_a["to"], by_a["granularity"]) == (span["from"], span["to"], "day")
        assert by_a["totals"] == a_sum == added(by_a["data"])
        assert [row["start"] for row in busy(by_a["data"])] == [f"{day}T00:00:00Z"]
        by_hour = answer(api.get("/usage", params={"owner": a, "granularity": "hour"}), 200)
        assert by_hour["totals"] == a_sum and len(by_hour["data"]) == 48

        by_b = answer(api.get("/usage", params={"owner": b, **span}), 200)
        assert (by_b["keys"], by_b["totals"]) == (2, counts(requests=3))
        nobody = answer(api.get("/usage", params={"owner": f"nobody-{uuid.uuid4().hex}"}), 200)
        assert (nobody["keys"], nobody["totals"], len(nobody["data"])) == (0, ZERO, 30)

        everyone = answer(api.get("/usage", params=span), 200)
        assert everyone["owner"] is None
        assert everyone["keys"] >= 5
        least = counts(requests=6 + 3, rejected=1 + 1)
        for name in FIELDS:
            assert everyone["totals"][name] >= least[name]

        top = answer(api.get("/usage/top", params={"date": day, "limit": 100}), 200)
        assert (top["object"], top["date"]) == ("list", day)
        ids = [row["id"] for row in top["data"]]
        assert ids.index(busiest.id) < ids.index(other.id) < ids.index(quiet.id)
        requests = [row["requests"] for row in top["data"]]
        assert requests == sorted(requests, reverse=True)
        assert all(row["requests"] or row["rate_limited"] or row["rejected"] for row in top["data"])
        row = top["data"][ids.index(other.id)]
        assert row == {
            "id": other.id,
            "name": "the b key",
            "owner": b,
            "plan": "free",
            "start": f"{day}T00:00:00Z",
            **counts(requests=3),
        }
        assert top["data"][ids.index(quiet.id)]["rejected"] == 1
        assert top["data"][ids.index(broke.id)]["requests"] == 0
        assert top["data"][ids.index(broke.id)]["rejected"] == 1
        assert ids.index(quiet.id) < ids.index(broke.id)
        assert idle.id not in ids
        for limit in (1, 2):
            cut = answer(api.get("/usage/top", params={"date": day, "limit": limit}), 200)
            assert cut["data"] == top["data"][:limit]
        default = answer(api.get("/usage/top", params={"date": day}), 200)
        assert default["data"] == top["data"][:10]
        long_ago = answer(api.get("/usage/top", params={"date": "2001-01-01"}), 200)
        assert long_ago["data"] == []


# 7. The previous secret during a rotation grace.


def test_the_previous_secret_is_counted_during_its_grace(
    pair: Pair, redis_server: RedisServer, make_key: MakeKey, r: redis.Redis
) -> None:
    """After a rotation with a grace, every answer to the old secret (admitted or refused)
    counts in `previous_key_requests` and sets `previous_key_last_used`; the new secret's do
    not; the usage history counts both. The CLI says so. Another rotation resets both."""
    old, rec = make_key("free")
    assert get(pair.a.url, old) == 200
    with admin(pair.a) as api:
        shown = answer(api.get(f"/keys/{rec.id}"), 200)
        assert (shown["previous_key_requests"], shown["previous_key_last_used"]) == (0, None)
        rotated = answer(api.post(f"/keys/{rec.id}/rotate", json={"grace_seconds": 600}), 200)
        new = rotated["key"]
        assert (rotated["previous_key_requests"], rotated["previous_key_last_used"]) == (0, None)

        assert [get(pair.a.url, new), get(pair.b.url, new)] == [200, 200]
        shown = answer(api.get(f"/keys/{rec.id}"), 200)
        assert (shown["previous_key_requests"], shown["previous_key_last_used"]) == (0, None)

        first = redis_time(r)
        assert [get(pair.a.url, old), get(pair.b.url, old), get(pair.a.url, old)] == [200] * 3
        answer(api.post(f"/keys/{rec.id}/pause"), 200)
        assert get(pair.b.url, old) == 403  # refused, still an answer to the previous secret
        assert get(pair.b.url, new) == 403
        answer(api.post(f"/keys/{rec.id}/resume"), 200)
        assert get(pair.a.url, forge_key(PREFIX, rec.id)) == 401  # neither secret: not counted
        last = redis_time(r)
        shown = answer(api.get(f"/keys/{rec.id}"), 200)
        assert shown["previous_key_requests"] == 4
        assert first <= shown["previous_key_last_used"] <= last
        assert shown["requests"] == 1 + 2 + 3
        assert totals(api, r, rec.id) == counts(requests=6, rejected=2)

        shown_cli = run_cli("keys", "show", rec.id, "--json", redis_url=redis_server.url)
        assert shown_cli.returncode == 0, shown_cli.stderr
        as_json = json.loads(shown_cli.stdout)
        assert as_json["previous_key_requests"] == 4
        assert as_json["previous_key_last_used"] == shown["previous_key_last_used"]
        table = run_cli("keys", "usage", rec.id, "--days", "2", redis_url=redis_server.url)
        assert table.returncode == 0, table.stderr
        used = utc(shown["previous_key_last_used"]).strftime("%Y-%m-%dT%H:%M:%SZ")
        until = utc(shown["previous_key_valid_until"]).strftime("%Y-%m-%dT%H:%M:%SZ")
        line = (
            f"previous secret: valid until {until}, 4 requests since the rotation, last used {used}"
        )
        assert line in table.stdout.splitlines(), table.stdout

        again = answer(api.post(f"/keys/{rec.id}/rotate", json={"grace_seconds": 600}), 200)
        assert (again["previous_key_requests"], again["previous_key_last_used"]) == (0, None)
        assert get(pair.a.url, old) == 401  # two rotations ago: unknown, counted nowhere
        shown = answer(api.get(f"/keys/{rec.id}"), 200)
        assert (shown["previous_key_requests"], shown["previous_key_last_used"]) == (0, None)
        assert get(pair.a.url, new) == 200  # now the previous secret
        shown = answer(api.get(f"/keys/{rec.id}"), 200)
        assert shown["previous_key_requests"] == 1
        assert shown["previous_key_last_used"] is not None
        assert totals(api, r, rec.id) == counts(requests=7, rejected=2)
        once = run_cli("keys", "usage", rec.id, "--days", "1", redis_url=redis_server.url)
        assert once.returncode == 0, once.stderr
        assert "1 requests since the rotation" in once.stdout

        # a model-scoped key is asked twice (code 10: read the body, then ask again): one count
        scoped_key, scoped = make_key("free", scopes={"models": ["unit-*"]})
        answer(api.post(f"/keys/{scoped.id}/rotate", json={"grace_seconds": 600}), 200)
        assert post(pair.a.url, scoped_key, chat_body("unit-1")).status_code == 200
        assert post(pair.a.url, scoped_key, chat_body("gpt-4")).status_code == 403
        shown = answer(api.get(f"/keys/{scoped.id}"), 200)
        assert shown["previous_key_requests"] == 2
        assert totals(api, r, scoped.id) == counts(requests=1, rejected=1)

        _, plain_rec = make_key("free")
        no_grace = run_cli("keys", "usage", plain_rec.id, redis_url=redis_server.url)
        assert no_grace.returncode == 0, no_grace.stderr
        assert "previous secret" not in no_grace.stdout


# 8. One Redis command per unmetered request.


def test_unmetered_requests_still_cost_one_redis_command(
    pair: Pair, redis_server: RedisServer, make_key: MakeKey, r: redis.Redis
) -> None:
    """MONITOR sees exactly one EVALSHA per request of an unmetered key (admitted, refused,
    rate limited), while the usage hashes are written inside the script."""
    key, rec = make_key("free", rpm=4, rpd=1000)
    with httpx.Client(base_url=pair.a.url, headers=auth(key), timeout=10) as client:
        assert client.get("/v1/models").status_code == 200  # warm the connection pools
        with CommandCounter(redis_server.port) as counter:
            got = [client.get("/v1/models").status_code for _ in range(2)]
            got.append(client.post("/v1/chat/completions", content=chat_body()).status_code)
            got += [client.get("/v1/models").status_code for _ in range(2)]
    assert got == [200, 200, 200, 429, 429]
    assert counter.commands == ["EVALSHA"] * 5
    expected = counts(requests=4, rate_limited=2)
    assert stored_sum(r, rec.id, "day") == expected
    assert stored_sum(r, rec.id, "hour") == expected


# 9. Garbage.


def test_garbage_in_usage_keys_never_fails_a_request(
    pair: Pair, make_key: MakeKey, r: redis.Redis
) -> None:
    """A day hash whose `requests` is "abc" restarts from the next count (and gets its
    expiry); a plain string where the hour hash goes is left as it was; every request is a
    200. The admin API reads garbage as 0."""
    for _ in range(3):
        key, rec = make_key("free")
        now = redis_time(r)
        day, hour = usage_day_key(rec.id, day_of(now)), usage_hour_key(rec.id, hour_of(now))
        r.hset(day, mapping={"requests": "abc", "rejected": "x" * 30, "credits": "1.5"})
        r.set(hour, "not a hash")
        got = [get(pair.a.url, key) for _ in range(3)]
        if hour_of(redis_time(r)) == hour_of(now):
            break
        r.delete(hour)  # an hour passed: the counts went elsewhere, start again
    else:
        raise AssertionError("three hours passed in three tries")
    try:
        assert got == [200, 200, 200]
        assert r.hgetall(day) == {
            b"requests": b"3",
            b"rejected": b"x" * 30,
            b"credits": b"1.5",
        }
        assert r.expiretime(day) > now + 89 * 86400  # the reset was a first write
        assert r.type(hour) == b"string"
        assert r.get(hour) == b"not a hash"
        assert r.ttl(hour) == -1
        assert record_int(r, rec.id, "requests") == 3
        with admin(pair.a) as api:
            assert totals(api, r, rec.id) == counts(requests=3)  # garbage reads as 0
        # the count goes on where it can
        assert get(pair.b.url, key) == 200
        assert r.hget(day, "requests") == b"4" or redis_time(r) // 86400 != now // 86400
    finally:
        r.delete(hour)


def test_the_usage_api_reads_a_key_of_another_type_as_zeros(
    pair: Pair, make_key: MakeKey, r: redis.Redis
) -> None:
    """A string where an hour hash goes is left alone by the scripts; the usage API reads that
    hour as nothing counted rather than failing the whole answer (and every owner's sum)."""
    key, rec = make_key("free", owner=f"usage-wrongtype-{uuid.uuid4().hex[:8]}")
    now = redis_time(r)
    hour = usage_hour_key(rec.id, hour_of(now))
    r.set(hour, "not a hash", ex=3600)
    try:
        assert get(pair.a.url, key) == 200
        with admin(pair.a) as api:
            body = key_usage(api, rec.id, granularity="hour")
            assert body["totals"]["requests"] <= 1  # the hour written (if the hour changed)
            assert body["totals"] == added(body["data"])
            summed = api.get("/usage", params={"owner": rec.owner, "granularity": "hour"})
            assert answer(summed, 200)["totals"]["requests"] <= 1
    finally:
        r.delete(hour)


def test_the_usage_api_reads_a_number_redis_cannot_count_as_zero(
    pair: Pair, redis_server: RedisServer, make_key: MakeKey, r: redis.Redis
) -> None:
    """A day field holding a number outside Redis's 64-bit integers is garbage to the scripts
    (HINCRBY refuses it; the next count resets it), so the API and the CLI read it as 0, as
    they read "abc", instead of answering 500 (failing /admin/usage and /admin/usage/top for
    every key with it) or a traceback (`edge keys usage --json`)."""
    key, rec = make_key("free", owner=f"usage-huge-{uuid.uuid4().hex[:8]}")
    assert get(pair.a.url, key) == 200  # today, or yesterday if midnight passes now
    now = redis_time(r)
    earlier = usage_day_key(rec.id, day_of(now - 2 * 86400))  # a day no request writes to
    r.hset(earlier, mapping={"credits": "9" * 30, "rejected": "-" + "9" * 25})
    r.expire(earlier, 3 * 86400)
    try:
        with admin(pair.a) as api:
            body = key_usage(api, rec.id, **{"from": day_of(now - 2 * 86400), "to": day_of(now)})
            assert body["totals"] == counts(requests=1)
            summed = api.get("/usage", params={"owner": rec.owner})
            assert answer(summed, 200)["totals"] == counts(requests=1)
            top = api.get("/usage/top", params={"date": day_of(now - 2 * 86400), "limit": 100})
            answer(top, 200)
        url = redis_server.url
        shown = run_cli("keys", "usage", rec.id, "--days", "4", "--json", redis_url=url)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["totals"] == counts(requests=1)
    finally:
        r.delete(earlier)


# 10. Redis Cluster.


@pytest.mark.cluster
def test_usage_on_a_cluster_lives_in_the_record_slot(
    spawn_edge: SpawnEdge, redis_cluster: RedisCluster, upstream: FakeUpstream
) -> None:
    """Keys on each of the three masters, requests through an edge on the cluster: exact
    totals per key and per owner from the admin API; every usage key in its record's slot, on
    the master that owns the record."""
    owner = f"usage-cluster-{uuid.uuid4().hex[:8]}"
    keys: list[tuple[str, KeyRecord]] = []
    masters: set[int] = set()
    while len(masters) < 3:
        assert len(keys) < 20, "no key landed on some master"
        key, rec = new_key(redis_cluster.url, "free", owner=owner, rpm=3, rpd=1000)
        keys.append((key, rec))
        masters.add(redis_cluster.node_for(record_key(rec.id)).port)
    proc = spawn_edge(usage_env(redis_cluster.url, upstream.url), name="cluster")
    expected: dict[str, dict[str, int]] = {}
    for i, (key, rec) in enumerate(keys):
        n = 1 + i % 5  # rpm 3: the 4th and 5th are 429s
        got = [get(proc.url, key) for _ in range(n)]
        assert got == [200] * min(n, 3) + [429] * max(0, n - 3)
        expected[rec.id] = counts(requests=min(n, 3), rate_limited=max(0, n - 3))
    node = redis_cluster.nodes[0].client()
    try:
        span = days_around(node)
        with admin(proc) as api:
            for rec_id, want in expected.items():
                assert totals(api, node, rec_id) == want
            by_owner = answer(api.get("/usage", params={"owner": owner, **span}), 200)
            assert by_owner["keys"] == len(keys)
            assert by_owner["totals"] == added(list(expected.values()))
            hours = answer(api.get("/usage", params={"owner": owner, "granularity": "hour"}), 200)
            assert hours["totals"] == by_owner["totals"]
        for _, rec in keys:
            slot = node.cluster("keyslot", record_key(rec.id))
            master = redis_cluster.node_for(record_key(rec.id)).client()
            try:
                names = [
                    n.decode()
                    for n in master.scan_iter(match=f"{record_key(rec.id)}:*", count=1000)
                ]
                usage = [n for n in names if ":day:" in n or ":hour:" in n]
                assert len(usage) >= 2, names
                for name in usage:
                    assert node.cluster("keyslot", name) == slot
                assert stored_sum(master, rec.id, "day") == expected[rec.id]
            finally:
                master.close()
    finally:
        node.close()


# 11. Embedded mode.


def test_usage_in_embedded_mode(spawn_edge: SpawnEdge) -> None:
    """No Redis URL (fakeredis inside edge) and the built-in demo upstream: a key made through
    the admin API has its three requests in the usage history."""
    proc = spawn_edge(edge_env("", "", EDGE_ADMIN_TOKEN=ADMIN_TOKEN), name="embedded")
    assert "EMBEDDED REDIS" in proc.log()
    with admin(proc) as api:
        created = answer(api.post("/keys", json={"plan": "free", "credits": 100}), 201)
        key, kid = created["key"], created["id"]
        with httpx.Client(base_url=proc.url, headers=auth(key), timeout=10) as client:
            assert client.get("/v1/models").status_code == 200
            chat = {"model": "edge-demo", "messages": [{"role": "user", "content": "Hello"}]}
            assert client.post("/v1/chat/completions", json=chat).status_code == 200
            assert client.get("/v1/models").status_code == 200
        body = key_usage(api, kid)
        assert len(body["data"]) == 30
        assert body["totals"] == counts(requests=3, credits=3)
        hours = key_usage(api, kid, granularity="hour")
        assert len(hours["data"]) == 48
        assert hours["totals"] == counts(requests=3, credits=3)
        owner_sum = answer(api.get("/usage"), 200)
        assert owner_sum["totals"]["requests"] >= 3
        # the day of the requests (a day of edge's clock: embedded Redis is in edge's process)
        day_row = max(busy(body["data"]), key=lambda row: row["requests"])
        top = answer(api.get("/usage/top", params={"date": day_row["start"][:10]}), 200)
        assert [row["id"] for row in top["data"]] == [kid]  # the demo key made no request
        assert top["data"][0]["requests"] == day_row["requests"]


# 12. The API's validation matrix and the CLI.


def test_usage_api_defaults_and_validation(pair: Pair, make_key: MakeKey, r: redis.Redis) -> None:
    """Defaults (30 days, or today and yesterday by hour, from Redis's today), every period a
    row, the range limits, and each bad query a 422 naming its parameter; 404 and 401."""
    key, rec = make_key("free")
    assert get(pair.a.url, key) == 200
    path = f"/keys/{rec.id}/usage"
    with admin(pair.a) as api:
        body = key_usage(api, rec.id)
        today = date.fromisoformat(body["to"])
        assert today in {utc(redis_time(r)).date(), utc(redis_time(r)).date() - timedelta(days=1)}
        assert body["from"] == (today - timedelta(days=29)).isoformat()
        assert body["granularity"] == "day"
        assert set(body) == {"key", "object", "granularity", "from", "to", "data", "totals"}
        assert [row["start"] for row in body["data"]] == [
            f"{today - timedelta(days=29 - i)}T00:00:00Z" for i in range(30)
        ]
        for row in body["data"]:
            assert set(row) == {"start", *FIELDS}
        assert set(body["totals"]) == set(FIELDS)

        hours = key_usage(api, rec.id, granularity="hour")
        first = date.fromisoformat(hours["from"])
        assert hours["to"] == (first + timedelta(days=1)).isoformat()
        midnight = datetime(first.year, first.month, first.day, tzinfo=UTC)
        assert [row["start"] for row in hours["data"]] == [
            (midnight + timedelta(hours=h)).strftime("%Y-%m-%dT%H:%M:%SZ") for h in range(48)
        ]

        year = key_usage(api, rec.id, **{"from": "2024-01-01", "to": "2024-12-31"})
        assert len(year["data"]) == 366 and year["totals"] == ZERO
        week = key_usage(
            api, rec.id, **{"from": "2024-02-25", "to": "2024-03-02", "granularity": "hour"}
        )
        assert len(week["data"]) == 7 * 24
        assert week["data"][4 * 24]["start"] == "2024-02-29T00:00:00Z"
        one = key_usage(api, rec.id, **{"from": "2024-05-05", "to": "2024-05-05"})
        assert [row["start"] for row in one["data"]] == ["2024-05-05T00:00:00Z"]
        only_to = key_usage(api, rec.id, to="2024-03-01")
        assert (only_to["from"], len(only_to["data"])) == ("2024-02-01", 30)  # a leap year

        bad: list[tuple[str, dict[str, str], str]] = [
            (path, {"from": "2024-05-06", "to": "2024-05-05"}, "from"),
            (path, {"from": "2024-01-01", "to": "2025-01-01"}, "from"),  # 367 days
            (path, {"from": "2024-01-01", "to": "2024-01-08", "granularity": "hour"}, "from"),
            (path, {"granularity": "week"}, "granularity"),
            (path, {"granularity": "Day"}, "granularity"),
            (path, {"from": "2024-13-01"}, "from"),
            (path, {"from": "yesterday"}, "from"),
            (path, {"to": "2024-02-30"}, "to"),
            (path, {"to": ""}, "to"),
            (path, {"days": "7"}, "days"),
            (path, {"owner": "someone"}, "owner"),
            ("/usage", {"bogus": "1"}, "bogus"),
            ("/usage", {"from": "2024-05-06", "to": "2024-05-05"}, "from"),
            ("/usage", {"granularity": "minute"}, "granularity"),
            ("/usage/top", {"limit": "0"}, "limit"),
            ("/usage/top", {"limit": "101"}, "limit"),
            ("/usage/top", {"limit": "ten"}, "limit"),
            ("/usage/top", {"date": "2024-02-30"}, "date"),
            ("/usage/top", {"from": "2024-01-01"}, "from"),
        ]
        for where, params, param in bad:
            err = answer(api.get(where, params=params), 422)["error"]
            assert (err["type"], err["code"], err["param"]) == (
                "invalid_request_error",
                "invalid_value",
                param,
            ), (where, params, err)
            assert param in err["message"], err

        unknown = answer(api.get(f"/keys/{'A' * 12}/usage"), 404)["error"]
        assert unknown["code"] == "not_found"
        answer(api.get("/keys/not-a-key-id/usage"), 404)
        answer(api.post(path), 405)

    for headers in ({}, auth("x" * len(ADMIN_TOKEN)), {"Authorization": ADMIN_TOKEN}):
        for where in (path, "/usage", "/usage/top"):
            resp = httpx.get(f"{pair.a.url}/admin{where}", headers=headers, timeout=10)
            assert answer(resp, 401)["error"]["code"] == "invalid_admin_token", where


def cli_rows(stdout: str, hours: bool) -> tuple[list[str], list[list[str]]]:
    """The header and rows of `edge keys usage`'s table (an hour's start holds a space)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    header = lines[0].split()
    width = 2 if hours else 1
    rows = []
    for line in lines[1:]:
        if line.startswith("previous secret"):
            break
        cells = line.split()
        if cells[0] == "total":
            rows.append(cells)
        else:
            rows.append([" ".join(cells[:width]), *cells[width:]])
    return header, rows


def test_cli_usage_table_json_and_hours(
    pair: Pair, redis_server: RedisServer, make_key: MakeKey, r: redis.Redis
) -> None:
    """`edge keys usage`: a table by day (thousands separators, a total row), `--days`,
    `--json` as the API gives it, `--hours` the last 48 hours ending with Redis's current
    hour; bad input is an error."""
    key, rec = make_key("free")
    assert [get(pair.a.url, key) for _ in range(2)] == [200, 200]
    now = redis_time(r)
    today = utc(now).date()
    earlier = (today - timedelta(days=2)).isoformat()
    big = usage_day_key(rec.id, earlier)
    r.hset(big, mapping={"requests": 1_234_567, "input_tokens": 9_876_543_210, "credits": -5})
    r.expire(big, 3 * 86400)
    url = redis_server.url

    # 4 days: the row two days back is in them even if UTC midnight passes before the CLI reads
    table = run_cli("keys", "usage", rec.id, "--days", "4", redis_url=url)
    assert table.returncode == 0, table.stderr
    header, rows = cli_rows(table.stdout, hours=False)
    assert header == [
        "START",
        "REQUESTS",
        "RATE_LIMITED",
        "REJECTED",
        "INPUT_TOKENS",
        "OUTPUT_TOKENS",
        "CREDITS",
    ]
    assert len(rows) == 5
    days = [date.fromisoformat(row[0]) for row in rows[:-1]]
    assert days == [days[0] + timedelta(days=i) for i in range(4)]
    assert days[-1] in {today, today + timedelta(days=1)}
    assert [earlier, "1,234,567", "0", "0", "9,876,543,210", "0", "-5"] in rows
    assert rows[-1] == ["total", "1,234,569", "0", "0", "9,876,543,210", "0", "-5"]

    as_json = run_cli("keys", "usage", rec.id, "--days", "4", "--json", redis_url=url)
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert set(data) == {"key", "granularity", "data", "totals"}
    assert (data["key"], data["granularity"]) == (rec.id, "day")
    assert len(data["data"]) == 4
    big_row = {"start": f"{earlier}T00:00:00Z", **counts(
        requests=1_234_567, input_tokens=9_876_543_210, credits=-5
    )}  # fmt: skip
    assert big_row in data["data"]
    assert data["totals"] == counts(requests=1_234_569, input_tokens=9_876_543_210, credits=-5)

    default = run_cli("keys", "usage", rec.id, "--json", redis_url=url)
    assert len(json.loads(default.stdout)["data"]) == 30

    hours = run_cli("keys", "usage", rec.id, "--hours", "--json", redis_url=url)
    assert hours.returncode == 0, hours.stderr
    last = redis_time(r)
    by_hour = json.loads(hours.stdout)
    assert by_hour["granularity"] == "hour"
    starts = [row["start"] for row in by_hour["data"]]
    assert len(starts) == 48
    assert starts[-1] in {label(now, 3600), label(last, 3600)}
    assert starts == sorted(starts)
    spans = {
        datetime.fromisoformat(b.replace("Z", "+00:00"))
        - datetime.fromisoformat(a.replace("Z", "+00:00"))
        for a, b in itertools.pairwise(starts)
    }
    assert spans == {timedelta(hours=1)}
    assert by_hour["totals"] == counts(requests=2)

    hour_table = run_cli("keys", "usage", rec.id, "--hours", redis_url=url)
    assert hour_table.returncode == 0, hour_table.stderr
    _, hour_rows = cli_rows(hour_table.stdout, hours=True)
    assert len(hour_rows) == 49
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:00", hour_rows[0][0]), hour_rows[0]
    assert hour_rows[-1] == ["total", "2", "0", "0", "0", "0", "0"]

    for args in (("--days", "0"), ("--days", "367")):
        failed = run_cli("keys", "usage", rec.id, *args, redis_url=url)
        assert failed.returncode != 0
        assert "--days" in failed.stderr
    missing = run_cli("keys", "usage", "A" * 12, redis_url=url)
    assert missing.returncode != 0 and missing.stdout == ""
    no_redis = run_cli("keys", "usage", rec.id, redis_url=None)
    assert no_redis.returncode != 0 and "EDGE_REDIS_URL" in no_redis.stderr
