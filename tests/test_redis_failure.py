"""Redis failure and recovery (T08-T12 in docs/testplan.md): fail closed fast, recover by itself,
survive a flushed script cache without errors or over-admission."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import httpx
import pytest
import redis

from edge.keys import make_key, record_key
from tests.support.edge_process import EdgeProcess, auth, edge_env
from tests.support.fake_upstream import FakeUpstream
from tests.support.keys import new_key
from tests.support.metrics import scrape, value
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until


@pytest.mark.slow
def test_redis_down_fail_closed_and_recovers(
    spawn_edge, redis_factory, upstream: FakeUpstream
) -> None:
    """T08: Redis killed → fast 503 JSON, upstream untouched, not ready; Redis back → 200
    again without restarting edge."""
    server: RedisServer = redis_factory()
    proc: EdgeProcess = spawn_edge(edge_env(server.url, upstream.url))
    key, rec = new_key(server.url, "free", rpm=1000, rpd=100_000)
    with httpx.Client(base_url=proc.url, headers=auth(key), timeout=10) as client:
        assert client.get("/v1/models").status_code == 200
        saved = server.client().hgetall(record_key(rec.id))
        upstream.clear()
        before = scrape(proc.url)

        server.kill()
        latencies = []
        for _ in range(30):
            start = time.perf_counter()
            resp = client.get("/v1/models")
            latencies.append(time.perf_counter() - start)
            assert resp.status_code == 503
            assert resp.headers["content-type"] == "application/json"
            assert resp.json()["error"]["type"] == "service_unavailable"
        latencies.sort()
        assert latencies[-1] < 0.3, latencies[-5:]
        assert upstream.records == []
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200
        after = scrape(proc.url)
        grew = value(after, "edge_redis_errors_total", kind="connection") - value(
            before, "edge_redis_errors_total", kind="connection"
        )
        assert grew >= 30
        assert value(after, "edge_requests_total", plan="none", outcome="unavailable") >= 30

        server.restart()  # same port, empty: no persistence in this test
        server.client().hset(record_key(rec.id), mapping=saved)
        recovered = wait_until(lambda: client.get("/v1/models").status_code == 200, 2, every=0.05)
        assert recovered, "no recovery within 2 s"
        assert client.get("/readyz").status_code == 200
        # the restarted Redis had no scripts: edge reloaded them by itself
        assert value(scrape(proc.url), "edge_redis_errors_total", kind="noscript") >= 1


async def test_noscript_recovery_under_load(
    edge: EdgeProcess, redis_server: RedisServer, r: redis.Redis, upstream: FakeUpstream
) -> None:
    """T11: the script cache is flushed under concurrent load: no error, exactly 20 of 50
    admitted, every request answered.

    Five waves of 10 concurrent requests, each wave started right after a SCRIPT FLUSH, so
    every wave's pipelined EVALSHAs meet NOSCRIPT together (proved by the counter growing by
    at least one per wave), plus a flusher running while the waves are in flight.
    """
    key, _ = new_key(redis_server.url, "free", rpm=20, rpd=1000)
    before = value(scrape(edge.url), "edge_redis_errors_total", kind="noscript")

    async def one(client: httpx.AsyncClient) -> int:
        await asyncio.sleep(random.random() / 500)
        return (await client.get("/v1/models")).status_code

    async def flusher() -> int:
        flushes = 0
        for _ in range(3):
            await asyncio.to_thread(r.script_flush)
            flushes += 1
            await asyncio.sleep(0.003)
        return flushes

    limits = httpx.Limits(max_connections=10)
    results: list[int] = []
    async with httpx.AsyncClient(
        base_url=edge.url, headers=auth(key), limits=limits, timeout=20
    ) as client:
        for wave in range(5):
            r.script_flush()
            batch = asyncio.gather(*(one(client) for _ in range(10)))
            if wave == 2:
                statuses, _ = await asyncio.gather(batch, flusher())
            else:
                statuses = await batch
            results += statuses
    assert Counter(results) == {200: 20, 429: 30}
    assert len(upstream.records) == 20
    grew = value(scrape(edge.url), "edge_redis_errors_total", kind="noscript") - before
    assert grew >= 5, f"only {grew} NOSCRIPT answers for 5 flushed waves"


@pytest.mark.slow
def test_redis_blackhole_timeout_no_double_charge(
    spawn_edge, redis_factory, upstream: FakeUpstream
) -> None:
    """T09: Redis stopped (SIGSTOP) → every request fails within the deadline, never after
    retries; after SIGCONT it recovers; tokens charged == requests admitted."""
    server: RedisServer = redis_factory()
    proc: EdgeProcess = spawn_edge(edge_env(server.url, upstream.url))
    key, rec = new_key(server.url, "free", rpm=1000, rpd=100_000)
    admitted = 0
    with httpx.Client(base_url=proc.url, headers=auth(key), timeout=10) as client:
        for _ in range(5):
            admitted += client.get("/v1/models").status_code == 200
        before = value(scrape(proc.url), "edge_redis_errors_total", kind="timeout")
        server.pause()
        try:
            for _ in range(5):
                start = time.perf_counter()
                resp = client.get("/v1/models")
                assert time.perf_counter() - start < 0.6  # deadline 0.25 s, no retries
                assert resp.status_code == 503
                assert resp.json()["error"]["type"] == "service_unavailable"
        finally:
            server.resume()
        assert value(scrape(proc.url), "edge_redis_errors_total", kind="timeout") - before >= 5
        deadline = time.monotonic() + 2
        while True:
            status = client.get("/v1/models").status_code
            admitted += status == 200
            if status == 200:
                break
            assert time.monotonic() < deadline, "no recovery within 2 s"
            time.sleep(0.05)
    # Requests that timed out may have run in Redis once (the script is atomic) but never
    # twice: charged = admitted + at most the 5 timed-out ones.
    requests = int(server.client().hget(record_key(rec.id), "requests"))
    assert admitted <= requests <= admitted + 5


@pytest.mark.slow
def test_fail_open_admits_only_recently_validated_keys(
    spawn_edge, redis_factory, upstream: FakeUpstream
) -> None:
    """T10: with redis.fail_open, a Redis outage admits only keys this instance validated within
    fail_open_auth_ttl: never an unknown or forged key, never a paused, scoped or metered one;
    each such admission counted; after the TTL the validated key stops too."""
    server: RedisServer = redis_factory()
    env = edge_env(
        server.url, upstream.url, EDGE_REDIS_FAIL_OPEN="true", EDGE_REDIS_FAIL_OPEN_AUTH_TTL="2"
    )
    proc: EdgeProcess = spawn_edge(env)
    warm, warm_rec = new_key(server.url, "pro")
    cold, _ = new_key(server.url, "pro")
    paused, paused_rec = new_key(server.url, "pro")
    metered, _ = new_key(server.url, "pro", credits=100)
    scoped, _ = new_key(server.url, "pro", scopes={"routes": ["models"]})
    forged = make_key("gw_sk_", warm_rec.id)  # the right id and a valid checksum, wrong secret
    with httpx.Client(base_url=proc.url, timeout=10) as client:
        for key in (warm, paused, metered, scoped):
            assert client.get("/v1/models", headers=auth(key)).status_code == 200
        server.client().hset(record_key(paused_rec.id), "status", "paused")
        assert client.get("/v1/models", headers=auth(paused)).status_code == 403
        before = value(scrape(proc.url), "edge_fail_open_admissions_total", plan="pro")

        server.kill()
        assert client.get("/v1/models", headers=auth(warm)).status_code == 200
        for key in (cold, paused, metered, scoped, forged):
            resp = client.get("/v1/models", headers=auth(key))
            assert resp.status_code == 503, key
            assert resp.json()["error"]["type"] == "service_unavailable"
        assert client.get("/readyz").status_code == 503
        grew = value(scrape(proc.url), "edge_fail_open_admissions_total", plan="pro") - before
        assert grew == 1
        assert "fail-open: admitted key" in proc.log()

        time.sleep(2.2)  # past fail_open_auth_ttl
        assert client.get("/v1/models", headers=auth(warm)).status_code == 503
    assert warm not in proc.log() and forged not in proc.log()


@pytest.mark.slow
@pytest.mark.parametrize("persistent", [True, False], ids=["aof", "no-persistence"])
def test_redis_restart_with_and_without_persistence(
    spawn_edge, redis_factory, upstream: FakeUpstream, persistent: bool
) -> None:
    """T12: Redis restarted on the same port. With AOF (appendfsync always) keys and bucket
    state survive and edge reloads its scripts by itself; without persistence every key is a
    clean 401 JSON (never a 500) and readiness comes back."""
    extra = ("--appendonly", "yes", "--appendfsync", "always") if persistent else ()
    server: RedisServer = redis_factory(*extra)
    proc: EdgeProcess = spawn_edge(edge_env(server.url, upstream.url))
    key, _ = new_key(server.url, "free", rpm=10, rpd=1000)
    with httpx.Client(base_url=proc.url, headers=auth(key), timeout=10) as client:
        assert [client.get("/v1/models").status_code for _ in range(3)] == [200] * 3
        noscript_before = value(scrape(proc.url), "edge_redis_errors_total", kind="noscript")
        server.restart()
        assert wait_until(lambda: client.get("/readyz").status_code == 200, 3, every=0.05)
        resp = client.get("/v1/models")
        if persistent:
            assert resp.status_code == 200
            assert resp.headers["x-ratelimit-remaining-requests"] == "6"  # 10 - 4: state kept
            grew = value(scrape(proc.url), "edge_redis_errors_total", kind="noscript")
            assert grew > noscript_before  # the restarted Redis had no scripts: reloaded
        else:
            assert resp.status_code == 401
            assert resp.headers["content-type"] == "application/json"
            assert resp.json()["error"]["code"] == "invalid_api_key"
    assert "Traceback" not in proc.log()
