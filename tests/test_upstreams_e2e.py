"""Several upstreams (`[[upstreams]]` and `[routing]`) through real edge processes, real
upstream servers that say who they are (tests/support/named_upstream.py) and the session Redis.

Checked here, each against the upstreams' own request logs:

- a request goes where its route rule, its model id or its body's `model` says (globs), or to
  the first upstream when it names no model; each upstream gets its own provider key
  (`api_key_env`), never the client's;
- weights 1 and 3 split 1,000 requests about 25/75;
- failover: an upstream that cannot be reached, or answers a status in
  `routing.failover_statuses`, hands the request to the next one, never the same one twice,
  at most `max_attempts`; the last answer is relayed; counted in edge_upstream_failovers_total;
- never once the client has a byte (a stream cut midway, a read timeout);
- the circuit breaker: `cooldown_failures` failures take an upstream out for
  `cooldown_seconds` (edge_upstream_available 0), then it serves again;
- `/v1/models`: the union of the upstreams' lists, each filtered by its globs and by the key's
  model scopes; an upstream that fails is left out, all failing is a 502;
- a model no upstream serves: 404 `model_not_found`, the credit given back;
- the list and the routing in the environment (EDGE_UPSTREAMS, EDGE_ROUTING_*);
- bad configurations stop edge at start with one line;
- the one-upstream form (`[upstream]`) unchanged: one Redis command a request, `default`.

Which upstream an edge tries first is random by weight; the tests never depend on it: failing
upstreams share one `Failures` (the first request either receives fails), or a weight of 1000
against 1 makes the order all but certain where a test needs it (and it asserts with margin).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from edge.control.records import KeyRecord
from edge.keys import record_key
from tests.support.edge_process import REPO, EdgeProcess, auth, inherited_env
from tests.support.metrics import scrape, value
from tests.support.monitor import CommandCounter
from tests.support.named_upstream import (
    Failures,
    NamedUpstream,
    edge_config,
    edge_env_for,
    write_config,
)
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

MakeKey = Callable[..., tuple[str, KeyRecord]]
SpawnEdge = Callable[..., EdgeProcess]
Named = Callable[..., NamedUpstream]

ALPHA_SECRET = "sk-alpha-provider-0123456789"
BETA_SECRET = "sk-beta-provider-9876543210"
PATIENT = {"cooldown_failures": 100_000}  # a breaker that never opens in a test


@pytest.fixture
def named() -> Iterator[Named]:
    """`named("alpha", models, **knobs)`: a started NamedUpstream, stopped after the test."""
    started: list[NamedUpstream] = []

    def make(name: str, models: list[str] | None = None, **kw: Any) -> NamedUpstream:
        upstream = NamedUpstream(name, models, **kw).start()
        started.append(upstream)
        return upstream

    yield make
    for upstream in started:
        upstream.stop()


def start_edge(
    spawn_edge: SpawnEdge,
    redis_server: RedisServer,
    tmp_path: Path,
    text: str,
    **env: str,
) -> EdgeProcess:
    config = write_config(tmp_path / "edge.toml", text)
    return spawn_edge(edge_env_for(redis_server.url, config, **env))


def entry(name: str, upstream_url: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "url": upstream_url, **kw}


def chat(model: str, **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **kw}


def answered_by(resp: httpx.Response) -> str | None:
    return resp.headers.get("x-upstream-name")


def failovers(url: str, source: str, target: str, reason: str) -> float:
    labels = {"from": source, "to": target, "reason": reason}
    return value(scrape(url), "edge_upstream_failovers_total", **labels)


def all_failovers(url: str) -> float:
    return sum(v for (name, _), v in scrape(url).items() if name == "edge_upstream_failovers_total")


def available(url: str, upstream: str) -> float | None:
    samples = scrape(url)
    key = ("edge_upstream_available", (("upstream", upstream),))
    return samples.get(key)


# 1. Routing.


def test_routes_by_route_rule_model_id_and_body_model_each_with_its_own_key(
    spawn_edge: SpawnEdge,
    redis_server: RedisServer,
    make_key: MakeKey,
    named: Named,
    tmp_path: Path,
) -> None:
    alpha, beta = named("alpha"), named("beta")
    text = edge_config(
        [
            entry("alpha", alpha.url, api_key_env="ALPHA_KEY", models=["gpt-*", "o?"]),
            entry("beta", beta.url, api_key_env="BETA_KEY", models=["claude-*"], routes=["files"]),
        ]
    )
    proc = start_edge(
        spawn_edge, redis_server, tmp_path, text, ALPHA_KEY=ALPHA_SECRET, BETA_KEY=BETA_SECRET
    )
    key, _ = make_key("pro")
    cases: list[tuple[str, str, dict[str, Any] | None, str]] = [
        ("POST", "/v1/chat/completions", chat("gpt-4o"), "alpha"),
        ("POST", "/v1/chat/completions", chat("claude-3-opus"), "beta"),
        ("POST", "/v1/chat/completions", chat("o3"), "alpha"),
        ("GET", "/v1/models/claude-3-opus", None, "beta"),  # by the id in the path
        ("GET", "/v1/models/gpt-4o-mini", None, "alpha"),
        ("POST", "/v1/files", {"model": "gpt-4o"}, "beta"),  # the route rule first
        ("GET", "/v1/files/file-1", None, "beta"),
        ("POST", "/v1/embeddings", {"input": "no model named"}, "alpha"),  # the first upstream
        ("GET", "/v1/batches", None, "alpha"),
    ]
    with httpx.Client(base_url=proc.url, headers=auth(key), timeout=10) as client:
        for method, path, body, expected in cases:
            resp = client.request(method, path, json=body)
            assert resp.status_code == 200, (method, path, resp.text)
            assert answered_by(resp) == expected, (method, path, resp.headers)
            if path == "/v1/chat/completions":
                assert resp.json()["choices"][0]["message"]["content"] == f"from {expected}"
                assert resp.json()["model"] == body["model"]  # type: ignore[index]

    def seen(upstream: NamedUpstream) -> list[tuple[str, str]]:
        return [(s.method, s.path) for s in upstream.records]

    def wanted(name: str) -> list[tuple[str, str]]:
        return [(m, p) for m, p, _, who in cases if who == name]

    assert seen(alpha) == wanted("alpha")
    assert seen(beta) == wanted("beta")
    for upstream, secret in ((alpha, ALPHA_SECRET), (beta, BETA_SECRET)):
        for record in upstream.records:
            assert record.header("authorization") == f"Bearer {secret}"
            assert all(key not in v for _, v in record.raw_headers), "the client's key leaked"
            assert key.encode() not in record.body
    # the body edge read for its model went on byte for byte
    assert alpha.records[0].json() == chat("gpt-4o")
    assert beta.records[2].json() == {"model": "gpt-4o"}
    assert "Traceback" not in proc.log()


# 2. Weights.


async def _burst(url: str, key: str, n: int, concurrency: int) -> list[tuple[int, str | None]]:
    body = json.dumps(chat("gpt-4o-mini")).encode()
    headers = auth(key, **{"Content-Type": "application/json"})
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    results: list[tuple[int, str | None]] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=10) as c:

        async def worker(count: int) -> None:
            for _ in range(count):
                resp = await c.post("/v1/chat/completions", content=body)
                results.append((resp.status_code, answered_by(resp)))

        share, extra = divmod(n, concurrency)
        await asyncio.gather(*(worker(share + (i < extra)) for i in range(concurrency)))
    return results


@pytest.mark.slow
def test_weights_split_the_traffic(
    spawn_edge: SpawnEdge,
    redis_server: RedisServer,
    make_key: MakeKey,
    named: Named,
    tmp_path: Path,
) -> None:
    """Weights 1 and 3: of 1,000 requests the light upstream gets 25 % (binomial sd 1.4 %;
    within ±5 points is > 3.6 sd, and 1:1 or 1:2 weights fall outside)."""
    light, heavy = named("light"), named("heavy")
    text = edge_config([entry("light", light.url, weight=1), entry("heavy", heavy.url, weight=3)])
    proc = start_edge(spawn_edge, redis_server, tmp_path, text)
    key, _ = make_key("team", rpm=1_000_000, rpd=10_000_000)
    started = time.monotonic()
    results = asyncio.run(_burst(proc.url, key, 1000, 16))
    took = time.monotonic() - started
    assert Counter(status for status, _ in results) == {200: 1000}
    shares = Counter(name for _, name in results)
    assert set(shares) == {"light", "heavy"}
    assert (len(light.posts()), len(heavy.posts())) == (shares["light"], shares["heavy"])
    assert 0.20 <= shares["light"] / 1000 <= 0.30, (shares, f"{took:.1f} s")
    assert all_failovers(proc.url) == 0


# 3. Failover.


def test_failover_when_an_upstream_cannot_be_reached(
    spawn_edge: SpawnEdge,
    redis_server: RedisServer,
    make_key: MakeKey,
    named: Named,
    tmp_path: Path,
) -> None:
    """`dead` (weight 1000, so nearly always tried first) is a port nothing listens on: each
    request is answered by `live`, which receives it exactly once."""
    live = named("live")
    dead_url = f"http://127.0.0.1:{free_port()}/v1"
    text = edge_config(
        [entry("dead", dead_url, weight=1000), entry("live", live.url, weight=1)],
        {"max_attempts": 2, **PATIENT},
    )
    proc = start_edge(spawn_edge, redis_server, tmp_path, text)
    key, _ = make_key("pro")
    with httpx.Client(base_url=proc.url, headers=auth(key), timeout=10) as client:
        for i in range(10):
            resp = client.post("/v1/chat/completions", json=chat("gpt-4o", n=i))
            assert resp.status_code == 200, resp.text
            assert answered_by(resp) == "live"
            assert resp.json()["choices"][0]["message"]["content"] == "from live"
    assert [s.json()["n"] for s in live.posts()] == list(range(10))  # each exactly once
    assert wait_until(lambda: failovers(proc.url, "dead", "live", "unreachable") >= 8, 3)
    assert failovers(proc.url, "dead", "live", "unreachable") <= 10
    assert all_failovers(proc.url) == failovers(proc.url, "dead", "live", "unreachable")
    # /readyz is about edge itself: an upstream that is down does not take edge out of the
    # load balancer (its requests are served by the other)
    assert httpx.get(f"{proc.url}/readyz", timeout=5, trust_env=False).status_code == 200
    assert "Traceback" not in proc.log()


def test_failover_on_a_failover_status_tries_each_upstream_once(
    spawn_edge: SpawnEdge,
    redis_server: RedisServer,
    make_key: MakeKey,
    named: Named,
    tmp_path: Path,
) -> None:
    """`left` and `right` share their failures: the first request either receives fails,
    whichever edge tries first. A 503 moves on to the other (the client gets its 200); both
    failing ends after two attempts though max_attempts is 3 (never the same upstream twice),
    the last answer relayed; a 400 (not a failover status) is relayed at once."""
    gate = Failures()
    left, right = named("left", failures=gate), named("right", failures=gate)
    text = edge_config(
        [entry("left", left.url), entry("right", right.url)], {"max_attempts": 3, **PATIENT}
    )
    proc = start_edge(spawn_edge, redis_server, tmp_path, text)
    key, _ = make_key("pro")

    def tried() -> list[Any]:
        return sorted(left.posts() + right.posts(), key=lambda s: s.at)

    moves: Counter[tuple[str, str]] = Counter()
    with httpx.Client(base_url=proc.url, headers=auth(key), timeout=10) as client:
        for i in range(4):
            left.clear()
            right.clear()
            gate.set(1, 503)
            resp = client.post("/v1/chat/completions", json=chat("gpt-4o", n=i))
            assert resp.status_code == 200, resp.text
            first, second = tried()  # exactly two attempts
            assert (first.status, second.status) == (503, 200)
            assert first.upstream != second.upstream
            assert first.json()["n"] == second.json()["n"] == i
            assert answered_by(resp) == second.upstream
            assert resp.json()["choices"][0]["message"]["content"] == f"from {second.upstream}"
            moves[(first.upstream, second.upstream)] += 1

        left.clear()
        right.clear()
        gate.set(2, 502)
        resp = client.post("/v1/chat/completions", json=chat("gpt-4o"))
        first, second = tried()
        assert first.upstream != second.upstream
        assert resp.status_code == 502
        assert answered_by(resp) == second.upstream  # the last answer, as it was
        assert resp.json()["error"]["message"] == f"{second.upstream} failed with 502"
        both_failed = (first.upstream, second.upstream)

        left.clear()
        right.clear()
        gate.set(1, 400)
        resp = client.post("/v1/chat/completions", json=chat("gpt-4o"))
        [only] = tried()
        assert resp.status_code == 400 and answered_by(resp) == only.upstream
        assert resp.json()["error"]["message"] == f"{only.upstream} failed with 400"
        assert gate.left == 0

    def counted() -> bool:
        samples = scrape(proc.url)
        for (source, target), n in moves.items():
            labels = {"from": source, "to": target, "reason": "503"}
            if value(samples, "edge_upstream_failovers_total", **labels) != n:
                return False
        labels = {"from": both_failed[0], "to": both_failed[1], "reason": "502"}
        return value(samples, "edge_upstream_failovers_total", **labels) == 1

    assert wait_until(counted, 3), scrape(proc.url)
    assert wait_until(lambda: all_failovers(proc.url) == 5, 1)
    samples = scrape(proc.url)
    ok = sum(
        value(samples, "edge_upstream_responses_total", plan="pro", upstream=name, status="2xx")
        for name in ("left", "right")
    )
    assert ok == 4
    assert "Traceback" not in proc.log()


def test_no_failover_once_the_client_has_a_byte(
    spawn_edge: SpawnEdge,
    redis_server: RedisServer,
    make_key: MakeKey,
    named: Named,
    tmp_path: Path,
) -> None:
    """A stream is relayed from the one upstream that started it; a stream cut after two
    events is not repeated elsewhere (the client gets the two, no [DONE]); a POST the
    upstream read and then reset without answering, and a read timeout after the request went
    out, are not retried either."""
    one, two = named("one", chunks=4), named("two", chunks=4)
    text = edge_config(
        [entry("one", one.url, read_timeout=1.0), entry("two", two.url, read_timeout=1.0)],
        {"max_attempts": 2, **PATIENT},
    )
    proc = start_edge(spawn_edge, redis_server, tmp_path, text)
    key, _ = make_key("pro")

    def posts() -> list[Any]:
        return one.posts() + two.posts()

    with httpx.Client(base_url=proc.url, headers=auth(key), timeout=10) as client:
        resp = client.post("/v1/chat/completions", json=chat("gpt-4o", stream=True))
        assert resp.status_code == 200
        [record] = posts()
        events = [line for line in resp.text.split("\n\n") if line]
        assert events[-1] == "data: [DONE]"
        assert [f"from {record.upstream} {i} " in resp.text for i in range(4)] == [True] * 4
        assert answered_by(resp) == record.upstream
        assert wait_until(lambda: record.completed, 2)  # it sets this after its last write

        one.clear()
        two.clear()
        cut = {"x-named-reset-after": "2"}
        got = b""
        with (
            pytest.raises(httpx.HTTPError),
            client.stream(
                "POST", "/v1/chat/completions", json=chat("gpt-4o", stream=True), headers=cut
            ) as stream,
        ):
            assert stream.status_code == 200
            for piece in stream.iter_bytes():
                got += piece
        [record] = posts()
        assert record.events == 2 and not record.completed
        assert b"[DONE]" not in got
        assert got.count(f"from {record.upstream} ".encode()) == 2

        one.clear()
        two.clear()
        reset = {"x-named-reset": "1"}  # read the POST, then reset: it went out, no retry
        resp = client.post("/v1/chat/completions", json=chat("gpt-4o"), headers=reset)
        assert resp.status_code == 502, resp.text
        assert len(posts()) == 1, "the POST reached the upstreams twice"

        one.clear()
        two.clear()
        slow = {"x-named-delay": "1.5"}
        resp = client.post("/v1/chat/completions", json=chat("gpt-4o"), headers=slow)
        assert resp.status_code in (502, 504), resp.text
        assert len(posts()) == 1
    time.sleep(0.6)  # the slow upstream answers late; nobody asked the other meanwhile
    assert len(posts()) == 1
    assert all_failovers(proc.url) == 0
    assert "Traceback" not in proc.log()


def test_max_attempts_1_relays_the_503_and_the_list_from_the_environment(
    spawn_edge: SpawnEdge,
    redis_server: RedisServer,
    make_key: MakeKey,
    named: Named,
    tmp_path: Path,
) -> None:
    """EDGE_UPSTREAMS (JSON) and EDGE_ROUTING_MAX_ATTEMPTS=1: the list routes by model, and a
    503 from the upstream tried is the client's answer, the other never asked."""
    gate = Failures()
    one, two = named("one", failures=gate), named("two", failures=gate)
    listed = [
        {"name": "one", "url": one.url, "models": ["m-*", "only-one"], "api_key_env": "ONE_KEY"},
        {"name": "two", "url": two.url, "models": ["m-*"]},
    ]
    config = write_config(tmp_path / "plans.toml", edge_config())
    env = edge_env_for(
        redis_server.url,
        config,
        EDGE_UPSTREAMS=json.dumps(listed),
        EDGE_ROUTING_MAX_ATTEMPTS="1",
        ONE_KEY=ALPHA_SECRET,
    )
    proc = spawn_edge(env)
    key, _ = make_key("pro")
    with httpx.Client(base_url=proc.url, headers=auth(key), timeout=10) as client:
        resp = client.post("/v1/chat/completions", json=chat("only-one"))
        assert resp.status_code == 200 and answered_by(resp) == "one"
        assert one.posts()[0].header("authorization") == f"Bearer {ALPHA_SECRET}"
        one.clear()
        gate.set(1, 503)
        resp = client.post("/v1/chat/completions", json=chat("m-1"))
        [record] = one.posts() + two.posts()
        assert resp.status_code == 503
        assert answered_by(resp) == record.upstream
        assert resp.json() == {
            "error": {
                "message": f"{record.upstream} failed with 503",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        }
    time.sleep(0.2)
    assert len(one.posts() + two.posts()) == 1
    assert all_failovers(proc.url) == 0


# 4. The circuit breaker.


@pytest.mark.slow
def test_cooldown_takes_a_failing_upstream_out_then_back(
    spawn_edge: SpawnEdge,
    redis_server: RedisServer,
    make_key: MakeKey,
    named: Named,
    tmp_path: Path,
) -> None:
    """cooldown_failures = 2 within 30 s: after x's second 503 every request goes to y
    (x, weight 1000, would otherwise take nearly all) and edge_upstream_available{x} is 0;
    about cooldown_seconds = 2 later x serves again."""
    x, y = named("x"), named("y")
    routing = {"cooldown_failures": 2, "cooldown_window": 30, "cooldown_seconds": 2}
    text = edge_config([entry("x", x.url, weight=1000), entry("y", y.url, weight=1)], routing)
    proc = start_edge(spawn_edge, redis_server, tmp_path, text)
    key, _ = make_key("team", rpm=100_000, rpd=1_000_000)
    x.fail_next(2, 503)
    with httpx.Client(base_url=proc.url, headers=auth(key), timeout=10) as client:

        def ask() -> str | None:
            resp = client.post("/v1/chat/completions", json=chat("gpt-4o"))
            assert resp.status_code == 200, resp.text
            return answered_by(resp)

        for _ in range(20):  # x fails twice; y answers for it
            assert ask() == "y"
            if x.failures.left == 0:
                break
        cooled = time.monotonic()
        assert [s.status for s in x.records] == [503, 503]

        assert [ask() for _ in range(10)] == ["y"] * 10
        assert len(x.records) == 2  # skipped while it cools down
        assert wait_until(lambda: available(proc.url, "x") == 0, 1)
        assert available(proc.url, "y") == 1
        assert time.monotonic() - cooled < 1.8, "too slow to see the cooldown"

        back = None
        deadline = cooled + 6
        while time.monotonic() < deadline:
            if ask() == "x":
                back = time.monotonic() - cooled
                break
            time.sleep(0.05)
        assert back is not None, "x never came back"
        assert 1.5 <= back <= 4.0, back
        assert x.records[-1].status == 200
        assert wait_until(lambda: available(proc.url, "x") == 1, 2)
    assert "Traceback" not in proc.log()


# 5. /v1/models.


def test_models_list_is_the_filtered_union(
    spawn_edge: SpawnEdge,
    redis_server: RedisServer,
    make_key: MakeKey,
    named: Named,
    tmp_path: Path,
) -> None:
    alpha = named("alpha", ["gpt-4o", "gpt-4o-mini", "o3", "claude-x"])
    beta = named("beta", ["claude-3", "gpt-4o", "llama-3", "claude-x"])
    text = edge_config(
        [
            entry("alpha", alpha.url, models=["gpt-*", "o*"]),
            entry("beta", beta.url, models=["claude-*", "gpt-4o"]),
        ],
        PATIENT,
    )
    proc = start_edge(spawn_edge, redis_server, tmp_path, text)
    key, _ = make_key("pro")
    scoped, _ = make_key("pro", scopes={"models": ["gpt-4o*", "claude-3"]})

    def listing(k: str) -> dict[str, str]:
        resp = httpx.get(f"{proc.url}/v1/models", headers=auth(k), timeout=10)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["object"] == "list"
        ids = [m["id"] for m in body["data"]]
        assert len(ids) == len(set(ids)), ids
        assert all(m["object"] == "model" for m in body["data"])
        return {m["id"]: m["owned_by"] for m in body["data"]}

    assert listing(key) == {
        "gpt-4o": "alpha",  # beta lists it too: the first upstream wins
        "gpt-4o-mini": "alpha",
        "o3": "alpha",
        "claude-3": "beta",
        "claude-x": "beta",  # alpha's globs leave its claude-x out
    }
    assert [(s.method, s.path) for s in alpha.records] == [("GET", "/v1/models")]
    assert [(s.method, s.path) for s in beta.records] == [("GET", "/v1/models")]
    assert listing(scoped) == {"gpt-4o": "alpha", "gpt-4o-mini": "alpha", "claude-3": "beta"}

    beta.fail_next(5, 500)  # an upstream that fails is left out
    assert listing(key) == {"gpt-4o": "alpha", "gpt-4o-mini": "alpha", "o3": "alpha"}
    alpha.fail_next(5, 503)
    resp = httpx.get(f"{proc.url}/v1/models", headers=auth(key), timeout=10)
    assert resp.status_code == 502, resp.text
    assert "error" in resp.json()
    alpha.fail_next(0)
    beta.fail_next(0)
    assert set(listing(key)) == {"gpt-4o", "gpt-4o-mini", "o3", "claude-3", "claude-x"}
    assert "Traceback" not in proc.log()


# 6. No upstream for the model.


def test_unknown_model_is_a_404_and_the_credit_comes_back(
    spawn_edge: SpawnEdge,
    redis_server: RedisServer,
    make_key: MakeKey,
    named: Named,
    r: redis.Redis,
    tmp_path: Path,
) -> None:
    alpha, beta = named("alpha"), named("beta")
    text = edge_config(
        [entry("alpha", alpha.url, models=["gpt-*"]), entry("beta", beta.url, models=["claude-*"])]
    )
    proc = start_edge(spawn_edge, redis_server, tmp_path, text)
    key, rec = make_key("pro", credits=5)

    def balance() -> bytes | None:
        return r.hget(record_key(rec.id), "credits")  # type: ignore[return-value]

    with httpx.Client(base_url=proc.url, headers=auth(key), timeout=10) as client:
        for model in ("llama-3", "GPT-4o", "claude"):
            resp = client.post("/v1/chat/completions", json=chat(model))
            assert resp.status_code == 404, resp.text
            assert resp.headers["content-type"] == "application/json"
            assert resp.json() == {
                "error": {
                    "message": f"The model `{model}` does not exist or you do not have access "
                    "to it.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "model_not_found",
                }
            }
            assert wait_until(lambda: balance() == b"5", 2), balance()
        assert alpha.records == [] and beta.records == []
        resp = client.post("/v1/chat/completions", json=chat("gpt-4o"))
        assert resp.status_code == 200 and answered_by(resp) == "alpha"
        assert wait_until(lambda: balance() == b"4", 2), balance()  # a served one is charged


# 7. Configuration errors.


def run_serve(config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = inherited_env()
    full.update({"EDGE_CONFIG": str(config), "EDGE_SERVER_DRAIN_DELAY": "0", **env})
    return subprocess.run(
        [sys.executable, "-m", "edge", "serve", "--port", str(free_port())],
        env=full,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=20,
    )


def test_bad_upstream_configurations_stop_edge_at_start(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Exit non-zero with one line naming what is wrong, never a traceback: `[upstream] url`
    and `[[upstreams]]` together, an `api_key_env` naming an unset variable, two upstreams of
    one name, a name outside ^[a-z0-9][a-z0-9_.-]{0,31}$."""
    url = f"http://127.0.0.1:{free_port()}/v1"
    unset = "EDGE_TEST_UNSET_KEY_VAR"  # EDGE_*: never inherited by run_serve
    cases = {
        "both": (edge_config([entry("a", url)], upstream={"url": url}), ("upstreams",)),
        "unset": (edge_config([entry("a", url, api_key_env=unset)]), ("api_key_env", unset)),
        "same-name": (edge_config([entry("a", url), entry("a", url)]), ("upstreams",)),
        "bad-name": (edge_config([entry("Alpha!", url)]), ("upstreams",)),
    }
    for label, (text, needles) in cases.items():
        config = write_config(tmp_path / f"{label}.toml", text)
        done = run_serve(config, EDGE_REDIS_URL=redis_server.url)
        assert done.returncode != 0, (label, done.stdout, done.stderr)
        out = done.stderr.strip()
        assert "Traceback" not in out + done.stdout, (label, out)
        assert len(out.splitlines()) == 1, (label, out)
        assert any(n in out for n in needles), (label, out)


# 8. One upstream, as before.


def test_the_one_upstream_form_is_unchanged(
    spawn_edge: SpawnEdge,
    redis_server: RedisServer,
    make_key: MakeKey,
    named: Named,
    tmp_path: Path,
) -> None:
    """`[upstream]` alone: one upstream named `default` serving any model (no body read, no
    404 for a model it may not have), its key sent, and still one Redis command a request."""
    only = named("only", ["whatever-1", "whatever-2"])
    text = edge_config(upstream={"url": only.url, "api_key": ALPHA_SECRET})
    proc = start_edge(spawn_edge, redis_server, tmp_path, text)
    key, _ = make_key("free", rpm=100)
    with httpx.Client(base_url=proc.url, headers=auth(key), timeout=10) as client:
        assert client.get("/v1/models").status_code == 200  # warm the connection pools
        with CommandCounter(redis_server.port) as counter:
            listed = client.get("/v1/models")
            got = [listed.status_code]
            got += [
                client.post("/v1/chat/completions", json=chat(m)).status_code
                for m in ("no-such-model", "gpt-4o")
            ]
            streamed = client.post("/v1/chat/completions", json=chat("x", stream=True))
            got.append(streamed.status_code)
            got.append(client.get("/v1/models/whatever-9").status_code)
    assert got == [200] * 5
    assert counter.commands == ["EVALSHA"] * 5
    assert [m["id"] for m in listed.json()["data"]] == ["whatever-1", "whatever-2"]
    assert streamed.text.endswith("data: [DONE]\n\n")
    assert len(only.records) == 6
    assert {s.header("authorization") for s in only.records} == {f"Bearer {ALPHA_SECRET}"}

    def counted() -> float:
        labels = {"plan": "free", "upstream": "default", "status": "2xx"}
        return value(scrape(proc.url), "edge_upstream_responses_total", **labels)

    assert wait_until(lambda: counted() == 6, 3), scrape(proc.url)
    assert all_failovers(proc.url) == 0
