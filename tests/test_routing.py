"""Routing's pieces in process: the settings of several upstreams, the router's choices, the
circuit breaker on a clock the test turns, what a reload may change, and the one-upstream
path that reads no body (a spy on the exchange)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from edge import errors
from edge.proxy.policy import BodyModel, body_model
from edge.proxy.routing import Breaker, Router, Target
from edge.setting_changes import fixed_changes, live_changes
from edge.settings import ConfigError, load_settings
from edge.upstream_settings import RoutingSettings, Upstream, UpstreamSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakePool:
    class origin:  # stands in for Origin
        base_path = b"/v1"


def target(name: str, models: tuple[str, ...] = ("*",), weight: int = 1, **kw: Any) -> Target:
    clock = kw.pop("clock", Clock())
    spec = Upstream(name, UpstreamSettings(url="http://127.0.0.1:9/v1"), models, weight, **kw)
    breaker = Breaker(2, 30.0, 5.0, clock)
    return Target(spec, FakePool(), [], breaker)  # type: ignore[arg-type]


def upstreams_env(*entries: dict[str, Any], **extra: str) -> dict[str, str]:
    return {"EDGE_UPSTREAMS": json.dumps(list(entries)), **extra}


A = {"name": "a", "url": "http://127.0.0.1:1/v1", "models": ["gpt-*"]}
B = {"name": "b", "url": "http://127.0.0.1:2/v1", "models": ["gpt-4*", "Qwen/*"]}


# settings


def test_several_upstreams_inherit_the_upstream_section_and_read_keys_from_the_environment() -> (
    None
):
    env = upstreams_env(
        {**A, "api_key_env": "A_KEY", "read_timeout": 9.5}, B, EDGE_UPSTREAM_CONNECT_TIMEOUT="2.5"
    )
    env["A_KEY"] = "sk-a-secret"
    settings = load_settings(None, env)
    a, b = settings.upstream_list
    assert (a.name, a.models, a.weight, a.routes) == ("a", ("gpt-*",), 1, ())
    assert a.settings.api_key.get_secret_value() == "sk-a-secret"
    assert (a.settings.read_timeout, a.settings.connect_timeout) == (9.5, 2.5)
    assert b.settings.api_key.get_secret_value() == "" and b.settings.read_timeout == 600.0
    assert not settings.demo_upstream
    assert "sk-a-secret" not in repr(settings)


def test_the_single_upstream_is_named_default_and_serves_every_model() -> None:
    settings = load_settings(None, {"EDGE_UPSTREAM_URL": "http://127.0.0.1:3/v1"})
    [only] = settings.upstream_list
    assert (only.name, only.models, only.settings.url) == (
        "default",
        ("*",),
        "http://127.0.0.1:3/v1",
    )


@pytest.mark.parametrize(
    ("env", "says"),
    [
        (upstreams_env({**A, "api_key_env": "MISSING"}), "upstreams.0.api_key_env"),
        (upstreams_env({**A, "api_key": "sk-x"}), "provider keys are not read"),
        (upstreams_env(A, {**B, "name": "a"}), "same name"),
        (upstreams_env(A, EDGE_UPSTREAM_URL="http://127.0.0.1:4/v1"), "both set"),
        (upstreams_env({**A, "name": "Bad Name"}), "upstreams.0.name"),
        (upstreams_env({**A, "weight": 0}), "upstreams.0.weight"),
        (upstreams_env({**A, "url": "ftp://x"}), "upstreams.0.url"),
        (
            upstreams_env({**A, "min_connections": 20}, EDGE_UPSTREAM_MAX_CONNECTIONS="10"),
            "upstreams: a: min_connections (20) is more than max_connections (10)",
        ),
        ({"EDGE_UPSTREAMS": "[not json"}, "upstreams"),
        ({"EDGE_ROUTING_FAILOVER_STATUSES": "200"}, "routing.failover_statuses"),
        ({"EDGE_ROUTING_MAX_ATTEMPTS": "0"}, "routing.max_attempts"),
    ],
)
def test_bad_upstream_settings_are_one_clear_error(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, env)
    assert says in str(caught.value)
    assert "sk-x" not in str(caught.value)


def test_a_provider_key_written_in_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text('[[upstreams]]\nname = "a"\nurl = "http://127.0.0.1:1/v1"\napi_key = "sk-x"\n')
    with pytest.raises(ConfigError, match="api_key_env"):
        load_settings(path, {})


def test_what_a_reload_may_change() -> None:
    base = load_settings(None, {})
    plans = load_settings(None, {"EDGE_PLANS_FREE_RPM": "7", **upstreams_env(A, B)})
    assert live_changes(base, plans) == ["plans", "upstreams"] and fixed_changes(base, plans) == []
    moved = load_settings(None, {"EDGE_SERVER_PORT": "9999", "EDGE_REDIS_TIMEOUT": "1"})
    assert fixed_changes(base, moved) == ["server.port", "redis.timeout"]


# the router


def test_routes_rules_then_model_globs_then_the_first_upstream() -> None:
    a, b = target("a", ("gpt-*",)), target("b", ("gpt-4*", "Qwen/*"), routes=("files",))
    router = Router([a, b], RoutingSettings())
    assert router.claimed("files") == [b] and router.claimed("files/file-1/content") == [b]
    assert router.claimed("filesystem") == [] and router.claimed("chat/completions") == []
    assert router.serving("gpt-3.5") == [a] and router.serving("Qwen/Qwen2-7B") == [b]
    assert router.serving("gpt-4o") == [a, b] and router.serving("claude") == []
    assert router.serving(None) == [a]
    assert router.model_of_route("models/gpt-4o") == "gpt-4o"
    assert router.model_of_route("models") is None


def test_weights_share_the_first_choice() -> None:
    light, heavy = target("light", weight=1), target("heavy", weight=3)
    router = Router([light, heavy], RoutingSettings(max_attempts=2))
    firsts = Counter(router.order([light, heavy])[0].name for _ in range(4000))
    assert 0.70 < firsts["heavy"] / 4000 < 0.80
    assert all(len(router.order([light, heavy])) == 2 for _ in range(50))
    assert len(Router([light, heavy], RoutingSettings(max_attempts=1)).order([light, heavy])) == 1


def test_the_breaker_takes_an_upstream_out_and_probes_it_again() -> None:
    clock = Clock()
    sick, well = target("sick", clock=clock), target("well", clock=clock)
    router = Router([sick, well], RoutingSettings())
    sick.breaker.failed()
    assert sick.breaker.available()  # one failure of two
    clock.now += 31  # the first one left the window
    sick.breaker.failed()
    assert sick.breaker.available()
    sick.breaker.failed()
    assert not sick.breaker.available()
    assert [t.name for t in router.order([sick, well])] == ["well"]
    clock.now += 5  # cooled down: live traffic probes it
    assert sick.breaker.available()
    sick.breaker.failed()  # a failed probe: out again at once
    assert not sick.breaker.available()
    clock.now += 5
    assert sick.breaker.available()
    sick.breaker.succeeded()
    sick.breaker.failed()
    assert sick.breaker.available()  # a good probe closed it: two failures needed again


def test_when_every_upstream_is_out_the_least_recently_failed_is_tried_first() -> None:
    clock = Clock()
    first, second = target("first", clock=clock), target("second", clock=clock)
    for t in (first, second):
        t.breaker.failed()
        t.breaker.failed()
        clock.now += 1
    router = Router([second, first], RoutingSettings())
    assert [t.name for t in router.order([second, first])] == ["first", "second"]


# one upstream: no body read to route


async def test_one_upstream_reads_no_body_to_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """A spy on Exchange.read_body: with one upstream and a key without model scopes, the
    body is never read whole; with two, it is (once)."""
    import httpx

    from edge.app import create_app
    from edge.proxy.exchange import Exchange
    from tests.support.fake_upstream import FakeUpstream
    from tests.support.keys import new_key
    from tests.support.redis_server import RedisServer

    reads: list[int] = []
    real = Exchange.read_body

    async def spy(self: Exchange, max_body: int, framed: bool) -> bytes:
        reads.append(1)
        return await real(self, max_body, framed)

    monkeypatch.setattr(Exchange, "read_body", spy)
    server = RedisServer(Path(__import__("tempfile").mkdtemp())).start()
    up = FakeUpstream().start()
    try:
        key, _ = new_key(server.url, "pro")
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        for env, expected in (
            ({"EDGE_UPSTREAM_URL": up.url}, 0),
            (upstreams_env({"name": "a", "url": up.url}, {"name": "b", "url": up.url}), 1),
        ):
            reads.clear()
            app = create_app(load_settings(None, {"EDGE_REDIS_URL": server.url, **env}))
            async with app.control.router.lifespan_context(app.control):
                transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
                async with httpx.AsyncClient(transport=transport, base_url="http://edge") as c:
                    r = await c.post(
                        "/v1/chat/completions",
                        json=body,
                        headers={"Authorization": f"Bearer {key}"},
                    )
            assert r.status_code == 200, r.text
            assert len(reads) == expected
    finally:
        up.stop()
        server.stop()


def test_choose_says_why_a_request_cannot_be_routed() -> None:
    a, b = target("a", ("gpt-*",)), target("b", ("Qwen/*",), routes=("files",))
    router = Router([a, b], RoutingSettings())

    def choose(route: str, body: bytes | None) -> tuple[object, str | None]:
        read = body_model(body) if body is not None else None
        return router.choose(route, router.claimed(route), read)

    chosen, model = choose("chat/completions", b'{"model": "Qwen/Qwen2"}')
    assert chosen == [b] and model == "Qwen/Qwen2"
    chosen, model = choose("chat/completions", b'{"model": "claude-3"}')
    assert isinstance(chosen, errors.ModelNotFound) and chosen.status == 404
    assert "`claude-3` does not exist" in chosen.message and model == "claude-3"
    chosen, _ = choose("chat/completions", b'{"model": "gpt-4o", "MODEL": "Qwen/x"}')
    assert isinstance(chosen, errors.BadRequest) and chosen.status == 400
    metered = router.choose("chat/completions", [], BodyModel("gpt-4o"))
    assert metered == ([a], "gpt-4o")
    assert choose("chat/completions", b"not json") == ([a], None)
    assert choose("files", b"--multipart--") == ([b], None)
    assert choose("models/Qwen/Qwen2", None) == ([b], "Qwen/Qwen2")
