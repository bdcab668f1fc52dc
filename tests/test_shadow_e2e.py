"""Shadow limits through two real edge processes on the session Redis: a shadowed key is let
through when its request buckets would refuse it, and the refusal it would have had is counted,
logged and shown in its rate-limit headers, but never enforced.

Plan `x` (rpm 3) shadows: edge `a` reads `shadow = true` from its config file, edge `b` from
`EDGE_PLANS_X_SHADOW=true`. Requests alternate between them, so the counts add up across
instances. Keys on the ordinary plan `free` are shadowed one by one through the admin API and
the CLI. Credits and scopes are never shadowed; turning shadow off enforces the limit at once.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import httpx
import pytest
import redis

from edge.keys import bucket_keys
from tests.support.edge_process import EdgeProcess, admin_json, auth, edge_env, run_cli
from tests.support.fake_upstream import FakeUpstream
from tests.support.metrics import scrape, value
from tests.support.named_upstream import PLANS, edge_config, write_config
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.multiproc

TOKEN = f"shadow-admin-{secrets.token_hex(12)}"
RPM = 3
OUTCOME = "shadow_limited_minute"
REMAINING = "x-ratelimit-remaining-requests"


class Pair:
    def __init__(self, a: EdgeProcess, b: EdgeProcess, config: str) -> None:
        self.a, self.b, self.config = a, b, config

    @property
    def both(self) -> tuple[EdgeProcess, EdgeProcess]:
        return self.a, self.b


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    fake_upstream_server: FakeUpstream,
) -> Iterator[Pair]:
    base = tmp_path_factory.mktemp("shadow")
    shadowed = write_config(
        base / "shadow.toml",
        edge_config(plans={**PLANS, "x": {"rpm": RPM, "rpd": 1000, "shadow": True}}),
    )
    plain = write_config(
        base / "plain.toml", edge_config(plans={**PLANS, "x": {"rpm": RPM, "rpd": 1000}})
    )
    common = {"EDGE_ADMIN_TOKEN": TOKEN, "EDGE_LOG_LEVEL": "info"}
    env_a = edge_env(
        redis_server.url, fake_upstream_server.url, EDGE_CONFIG=str(shadowed), **common
    )
    env_b = edge_env(
        redis_server.url,
        fake_upstream_server.url,
        EDGE_CONFIG=str(plain),
        EDGE_PLANS_X_SHADOW="true",
        **common,
    )
    a = EdgeProcess(base, env_a, "shadow-a").start()
    try:
        b = EdgeProcess(base, env_b, "shadow-b").start()
    except BaseException:
        a.stop()
        raise
    yield Pair(a, b, str(shadowed))
    b.stop()
    a.stop()


def admin(proc: EdgeProcess, method: str, path: str, body: Any = None) -> dict[str, Any]:
    return admin_json(proc, TOKEN, method, path, body)


def create(pair: Pair, **body: Any) -> tuple[str, str]:
    created = admin(pair.a, "POST", "/keys", body)
    return created["key"], created["id"]


def shadowed(procs: tuple[EdgeProcess, ...], plan: str) -> float:
    return sum(
        value(scrape(p.url), "edge_requests_total", plan=plan, outcome=OUTCOME) for p in procs
    )


def alternate(pair: Pair, key: str, n: int, path: str = "/v1/models") -> list[httpx.Response]:
    """`n` requests, a, b, a, b, …"""
    with httpx.Client(headers=auth(key), timeout=10) as client:
        return [client.get(pair.both[i % 2].url + path) for i in range(n)]


def minute_tokens(r: redis.Redis, kid: str) -> float:
    raw = r.hget(bucket_keys(kid)[0], "tokens")
    return float(raw) if raw is not None else float(RPM)


def log_lines(proc: EdgeProcess, kid: str) -> list[str]:
    pattern = re.compile(rf"shadow limit: key {kid} \(plan x\) would have been refused \(")
    return [line for line in proc.log().splitlines() if pattern.search(line)]


def test_a_shadow_plan_admits_past_its_limit_counted_exactly_across_two_instances(
    pair: Pair, upstream: FakeUpstream, r: redis.Redis
) -> None:
    key, kid = create(pair, plan="x")
    before = shadowed(pair.both, "x")
    before_each = [shadowed((p,), "x") for p in pair.both]
    started = time.monotonic()
    admitted = alternate(pair, key, RPM)
    tokens = minute_tokens(r, kid)
    over = alternate(pair, key, 9)
    elapsed = time.monotonic() - started

    assert [resp.status_code for resp in admitted + over] == [200] * 12
    assert len(upstream.records) == 12  # every one reached the upstream
    assert [resp.headers[REMAINING] for resp in admitted] == ["2", "1", "0"]
    assert [resp.headers[REMAINING] for resp in over] == ["0"] * 9  # what the limit would say
    assert shadowed(pair.both, "x") - before == 9  # exactly, summed over both instances
    after_each = [shadowed((p,), "x") for p in pair.both]
    assert [after - b for after, b in zip(after_each, before_each, strict=True)] == [5, 4]
    assert minute_tokens(r, kid) >= tokens - 1e-9  # no shadowed request was charged

    # logged, by each instance, but not once per request
    for proc in pair.both:
        assert wait_until(partial(log_lines, proc, kid), 5), proc.log()[-3000:]
        assert len(log_lines(proc, kid)) <= min(4, int(elapsed) + 2), log_lines(proc, kid)


def test_shadow_through_the_admin_api_on_a_plan_that_enforces(
    pair: Pair, upstream: FakeUpstream
) -> None:
    key, kid = create(pair, plan="free", rpm=RPM)
    assert [resp.status_code for resp in alternate(pair, key, RPM)] == [200] * RPM
    assert [resp.status_code for resp in alternate(pair, key, 2)] == [429, 429]  # free enforces

    record = admin(pair.b, "PATCH", f"/keys/{kid}", {"shadow": True})
    assert record["shadow"] is True
    assert admin(pair.a, "GET", f"/keys/{kid}")["shadow"] is True
    before = shadowed(pair.both, "free")
    upstream.clear()
    over = alternate(pair, key, 6)
    assert [resp.status_code for resp in over] == [200] * 6
    assert [resp.headers[REMAINING] for resp in over] == ["0"] * 6
    assert len(upstream.records) == 6
    assert shadowed(pair.both, "free") - before == 6

    # off again: enforced on the very next request, on both instances
    assert admin(pair.a, "PATCH", f"/keys/{kid}", {"shadow": False})["shadow"] is False
    upstream.clear()
    refused = alternate(pair, key, 2)
    assert [resp.status_code for resp in refused] == [429, 429]
    assert all(int(resp.headers["retry-after"]) >= 1 for resp in refused)
    admin(pair.a, "PATCH", f"/keys/{kid}", {"shadow": None})  # the plan's: free enforces
    assert [resp.status_code for resp in alternate(pair, key, 2)] == [429, 429]
    assert upstream.records == []


def test_turning_shadow_off_on_a_shadow_plan_key_enforces_at_once(
    pair: Pair, upstream: FakeUpstream
) -> None:
    key, kid = create(pair, plan="x")
    assert [resp.status_code for resp in alternate(pair, key, RPM + 1)] == [200] * (RPM + 1)
    admin(pair.b, "PATCH", f"/keys/{kid}", {"shadow": False})
    assert [resp.status_code for resp in alternate(pair, key, 2)] == [429, 429]
    admin(pair.b, "PATCH", f"/keys/{kid}", {"shadow": None})  # the plan's again: shadowed
    assert [resp.status_code for resp in alternate(pair, key, 2)] == [200, 200]
    assert len(upstream.records) == RPM + 1 + 2


def test_credits_and_scopes_are_never_shadowed(pair: Pair, upstream: FakeUpstream) -> None:
    broke, _ = create(pair, plan="x", credits=0)
    answers = alternate(pair, broke, RPM + 2)
    assert [resp.status_code for resp in answers] == [402] * (RPM + 2)
    assert {resp.json()["error"]["code"] for resp in answers} == {"insufficient_balance"}

    # one credit: spent by the first request; past the limit and out of credits is still 402
    one, _ = create(pair, plan="x", rpm=1, credits=1)
    assert [resp.status_code for resp in alternate(pair, one, 3)] == [200, 402, 402]

    scoped, _ = create(pair, plan="x", scopes={"routes": ["embeddings"]})
    embeddings = alternate(pair, scoped, RPM + 1, "/v1/embeddings")
    assert [resp.status_code for resp in embeddings] == [200] * (RPM + 1)  # the last shadowed
    refused = alternate(pair, scoped, 2)  # out of scope (and over the limit)
    assert [resp.status_code for resp in refused] == [403, 403]
    assert {resp.json()["error"]["code"] for resp in refused} == {"insufficient_permissions"}
    assert [rec.path for rec in upstream.records] == ["/v1/models"] + ["/v1/embeddings"] * (RPM + 1)


def cli(pair: Pair, redis_server: RedisServer, *args: str) -> dict[str, Any]:
    done = run_cli(*args, "--json", redis_url=redis_server.url, EDGE_CONFIG=pair.config)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert isinstance(data, dict)
    return data


def test_the_cli_sets_and_clears_shadow(
    pair: Pair, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    created = cli(pair, redis_server, "keys", "create", "--plan", "free", "--rpm", "1", "--shadow")
    assert created["shadow"] is True
    assert [resp.status_code for resp in alternate(pair, created["key"], 3)] == [200] * 3

    key, kid = create(pair, plan="free", rpm=1)
    assert [resp.status_code for resp in alternate(pair, key, 2)] == [200, 429]
    assert cli(pair, redis_server, "keys", "update", kid, "--shadow")["shadow"] is True
    assert [resp.status_code for resp in alternate(pair, key, 2)] == [200, 200]
    assert cli(pair, redis_server, "keys", "update", kid, "--no-shadow")["shadow"] is False
    assert [resp.status_code for resp in alternate(pair, key, 2)] == [429, 429]

    on_x, x_kid = create(pair, plan="x", rpm=1)
    cli(pair, redis_server, "keys", "update", x_kid, "--no-shadow")
    assert [resp.status_code for resp in alternate(pair, on_x, 2)] == [200, 429]
    cli(pair, redis_server, "keys", "update", x_kid, "--plan-shadow")  # plan x shadows
    assert [resp.status_code for resp in alternate(pair, on_x, 2)] == [200, 200]
    assert len(upstream.records) == 3 + 1 + 2 + 1 + 2
