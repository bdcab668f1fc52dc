"""Shared fixtures: a real redis-server and a fake upstream per session, edge processes on
free loopback ports, and fresh keys per test (no flushing)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from playwright.sync_api import Browser, sync_playwright

from edge.control.records import KeyRecord
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.edge_process import EdgeProcess, edge_env
from tests.support.fake_upstream import FakeUpstream
from tests.support.keys import new_key
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    yield client
    client.close()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Dedicated redis-servers for tests that kill, pause or restart them."""
    started: list[RedisServer] = []

    def make(*extra: str) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(started)}", None, *extra)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def fake_upstream_server() -> Iterator[FakeUpstream]:
    server = FakeUpstream().start()
    yield server
    server.stop()


@pytest.fixture
def upstream(fake_upstream_server: FakeUpstream) -> FakeUpstream:
    """The session's fake upstream, its request log cleared for this test."""
    fake_upstream_server.clear()
    return fake_upstream_server


@pytest.fixture(scope="session")
def edge(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    fake_upstream_server: FakeUpstream,
) -> Iterator[EdgeProcess]:
    """One edge process for the session: session Redis, fake upstream, debug logging."""
    proc = EdgeProcess(
        tmp_path_factory.mktemp("edge"), edge_env(redis_server.url, fake_upstream_server.url)
    ).start()
    yield proc
    proc.stop()


@pytest.fixture
def spawn_edge(tmp_path: Path) -> Iterator[Callable[..., EdgeProcess]]:
    """Start extra edge processes with their own environment; all stopped after the test."""
    procs: list[EdgeProcess] = []

    def spawn(env: dict[str, str], name: str = "edge", args: tuple[str, ...] = ()) -> EdgeProcess:
        proc = EdgeProcess(tmp_path, env, name, args)
        procs.append(proc)
        return proc.start()

    yield spawn
    for proc in procs:
        proc.stop()


@pytest.fixture
def make_key(redis_server: RedisServer) -> Callable[..., tuple[str, KeyRecord]]:
    """`make_key(plan="free", rpm=…, rpd=…, …)` → (plaintext key, record) on the session Redis."""

    def make(plan: str = "free", **kw: Any) -> tuple[str, KeyRecord]:
        return new_key(redis_server.url, plan, **kw)

    return make


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's chromium under Playwright, per module (a sync Playwright loop must not outlive
    the module's browser tests)."""
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: make test installs it (scripts/ensure-packages.sh)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
