"""Reloading a running edge's configuration: `POST /admin/reload`, SIGHUP (to one process or
to the supervisor of `--workers 2`), `edge reload`.

Checked through real edge processes, the session Redis and named upstreams
(tests/support/named_upstream.py):

- a plan's new rpm applies to the next request (`x-ratelimit-limit-requests`), the endpoint
  says what changed, and the reload is audited (actor admin, or signal);
- a file edge cannot use (a bad value, a change to a setting that cannot change live) is
  refused with 422 `invalid_config` naming the setting and one `reload refused:` log line, and
  the running configuration goes on;
- 50 streams in flight while the upstream list is swapped all finish whole on the upstream
  they started on; requests after the reload go to the new one;
- with two workers, SIGHUP to the supervisor reloads both.
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge.control.records import KeyRecord
from tests.support.edge_process import EdgeProcess, auth, run_cli
from tests.support.metrics import scrape, value
from tests.support.named_upstream import (
    PLANS,
    NamedUpstream,
    edge_config,
    edge_env_for,
    write_config,
)
from tests.support.procinfo import workers_of
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

MakeKey = Callable[..., tuple[str, KeyRecord]]
SpawnEdge = Callable[..., EdgeProcess]
ADMIN_TOKEN = "reload-admin-token-0123456789"


@pytest.fixture
def one() -> Iterator[NamedUpstream]:
    with NamedUpstream("one") as upstream:
        yield upstream


def plans(free_rpm: int) -> dict[str, dict[str, int]]:
    return {**PLANS, "free": {"rpm": free_rpm, "rpd": 100_000}}


def config_text(upstream: NamedUpstream, free_rpm: int, **kw: Any) -> str:
    return edge_config([{"name": upstream.name, "url": upstream.url}], plans=plans(free_rpm), **kw)


def start(
    spawn_edge: SpawnEdge,
    redis_server: RedisServer,
    config: Path,
    args: tuple[str, ...] = (),
) -> EdgeProcess:
    env = edge_env_for(redis_server.url, config, EDGE_ADMIN_TOKEN=ADMIN_TOKEN)
    return spawn_edge(env, args=args)


def limit_seen(url: str, key: str, fresh: bool = False) -> str | None:
    """The `x-ratelimit-limit-requests` of one request (`fresh`: on a new connection, so any
    worker may take it)."""
    headers = auth(key, Connection="close") if fresh else auth(key)
    resp = httpx.get(f"{url}/v1/models", headers=headers, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.headers.get("x-ratelimit-limit-requests")


def reload(url: str, token: str = ADMIN_TOKEN) -> httpx.Response:
    return httpx.post(f"{url}/admin/reload", headers=auth(token), timeout=10)


def audit(url: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{url}/admin/audit", params={"limit": 200}, headers=auth(ADMIN_TOKEN))
    assert resp.status_code == 200, resp.text
    return resp.json()["data"]  # type: ignore[no-any-return]


def reloads_since(url: str, since: float, actor: str) -> list[dict[str, Any]]:
    return [
        e
        for e in audit(url)
        if e["action"] == "reload" and e["time"] >= since - 1 and e["actor"].startswith(actor)
    ]


def refused(proc: EdgeProcess) -> list[str]:
    return [line for line in proc.log().splitlines() if "reload refused:" in line]


def assert_invalid_config(resp: httpx.Response, *names: str) -> str:
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert error["code"] == "invalid_config", error
    for name in names:
        assert name in error["message"], (name, error)
    return str(error["message"])


# 1. The endpoint.


def test_admin_reload_applies_a_new_plan_limit_and_is_audited(
    spawn_edge: SpawnEdge,
    redis_server: RedisServer,
    make_key: MakeKey,
    one: NamedUpstream,
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "edge.toml", config_text(one, 1000))
    proc = start(spawn_edge, redis_server, config)
    key, _ = make_key("free")
    assert limit_seen(proc.url, key) == "1000"

    write_config(config, config_text(one, 1500))
    since = time.time()
    assert reload(proc.url, "not-the-admin-token-at-all").status_code == 401
    assert limit_seen(proc.url, key) == "1000"  # nothing reloaded

    resp = reload(proc.url)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"reloaded": True, "changed": ["plans"]}
    assert limit_seen(proc.url, key) == "1500"
    assert wait_until(
        lambda: value(scrape(proc.url), "edge_plan_limit", plan="free", window="minute") == 1500,
        2,
    )
    [entry] = reloads_since(proc.url, since, "admin")
    assert abs(entry["time"] - time.time()) < 60

    resp = reload(proc.url)  # the same file again: nothing changed
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"reloaded": True, "changed": []}
    assert limit_seen(proc.url, key) == "1500"
    assert refused(proc) == []


def test_a_file_edge_cannot_use_is_refused_and_the_old_one_goes_on(
    spawn_edge: SpawnEdge,
    redis_server: RedisServer,
    make_key: MakeKey,
    one: NamedUpstream,
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "edge.toml", config_text(one, 1000))
    proc = start(spawn_edge, redis_server, config)
    key, _ = make_key("free")
    assert limit_seen(proc.url, key) == "1000"

    # an invalid value (a string where the rpm goes), and then plain broken TOML
    write_config(config, config_text(one, 1500).replace("rpm = 1500", 'rpm = "lots"'))
    assert_invalid_config(reload(proc.url), "plans.free.rpm")
    assert len(refused(proc)) == 1
    assert limit_seen(proc.url, key) == "1000"
    write_config(config, config_text(one, 1500) + "\n[plans.broken\n")
    assert_invalid_config(reload(proc.url))
    assert limit_seen(proc.url, key) == "1000"
    assert len(refused(proc)) == 2

    # valid, but settings only a restart can change ride along with a live one
    not_live = {"server": {"max_body_bytes": 1024}, "usage": {"retention_days": 7}}
    write_config(config, config_text(one, 1500, sections=not_live))
    assert_invalid_config(reload(proc.url), "server.max_body_bytes", "usage.retention_days")
    assert limit_seen(proc.url, key) == "1000"
    lines = refused(proc)
    assert len(lines) == 3
    assert "server.max_body_bytes" in lines[-1]

    # SIGHUP with a bad file is refused the same way
    write_config(config, config_text(one, 1500).replace("rpm = 1500", "rpm = -5"))
    os.kill(proc.pid, signal.SIGHUP)
    assert wait_until(lambda: len(refused(proc)) == 4, 5), proc.log()[-2000:]
    assert "plans.free.rpm" in refused(proc)[-1]
    assert limit_seen(proc.url, key) == "1000"

    write_config(config, config_text(one, 1500))  # fixed: now it applies
    resp = reload(proc.url)
    assert resp.status_code == 200, resp.text
    assert limit_seen(proc.url, key) == "1500"
    assert proc.proc is not None and proc.proc.poll() is None
    assert "Traceback" not in proc.log()


# 2. SIGHUP and `edge reload`.


def test_sighup_and_edge_reload_reload(
    spawn_edge: SpawnEdge,
    redis_server: RedisServer,
    make_key: MakeKey,
    one: NamedUpstream,
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "edge.toml", config_text(one, 1000))
    proc = start(spawn_edge, redis_server, config)
    key, _ = make_key("free")
    assert limit_seen(proc.url, key) == "1000"

    def shows(limit: str) -> bool:
        return limit_seen(proc.url, key) == limit

    write_config(config, config_text(one, 1100))
    since = time.time()
    os.kill(proc.pid, signal.SIGHUP)
    assert wait_until(lambda: shows("1100"), 5, every=0.1)
    assert wait_until(lambda: reloads_since(proc.url, since, "signal") != [], 2)

    write_config(config, config_text(one, 1200))
    done = run_cli("reload", "--pid", str(proc.pid), redis_url=None)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert wait_until(lambda: shows("1200"), 5, every=0.1)

    # without --pid: the pid file `edge serve` wrote for the configured port
    pid_file = Path(tempfile.gettempdir()) / f"edge-{proc.port}.pid"
    assert pid_file.read_text().strip() == str(proc.pid)
    write_config(config, config_text(one, 1300))
    done = run_cli("reload", redis_url=None, EDGE_SERVER_PORT=str(proc.port))
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert wait_until(lambda: shows("1300"), 5, every=0.1)

    assert proc.proc is not None and proc.proc.poll() is None
    assert refused(proc) == []
    assert "Traceback" not in proc.log()


# 3. Streams in flight while the upstreams change.


def _swap(config: Path, new: NamedUpstream) -> None:
    write_config(config, edge_config([{"name": new.name, "url": new.url}]))


@pytest.mark.slow
async def test_streams_in_flight_finish_on_the_upstream_they_started_on(
    spawn_edge: SpawnEdge,
    redis_server: RedisServer,
    make_key: MakeKey,
    tmp_path: Path,
) -> None:
    """50 streams of 20 events 0.1 s apart (about 2 s each) start on `old`; the upstream list
    is swapped to `new` meanwhile. Every stream ends whole with [DONE], from `old`; requests
    after the reload go to `new`."""
    with NamedUpstream("old", chunks=20, chunk_delay=0.1) as old, NamedUpstream("new") as new:
        config = tmp_path / "edge.toml"
        _swap(config, old)
        proc = start(spawn_edge, redis_server, config)
        key, _ = make_key("team", rpm=100_000, rpd=1_000_000)
        body = {"model": "gpt-4o", "messages": [], "stream": True}
        limits = httpx.Limits(max_connections=60, max_keepalive_connections=60)
        async with httpx.AsyncClient(
            base_url=proc.url, headers=auth(key), limits=limits, timeout=20
        ) as client:

            async def stream() -> tuple[int, str]:
                async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                    text = (await resp.aread()).decode()
                    return resp.status_code, text

            tasks = [asyncio.create_task(stream()) for _ in range(50)]
            for _ in range(100):  # every stream has begun on `old`
                if len(old.posts()) == 50 and all(s.events >= 1 for s in old.posts()):
                    break
                await asyncio.sleep(0.05)
            assert len(old.posts()) == 50
            assert not any(s.completed for s in old.posts()), "streams ended before the reload"

            _swap(config, new)
            resp = await client.post("/admin/reload", headers=auth(ADMIN_TOKEN))
            assert resp.status_code == 200, resp.text
            assert "upstreams" in resp.json()["changed"]
            after = [
                await client.post("/v1/chat/completions", json={"model": "gpt-4o"})
                for _ in range(5)
            ]
            assert [(r.status_code, r.headers.get("x-upstream-name")) for r in after] == [
                (200, "new")
            ] * 5
            assert not all(s.completed for s in old.posts()), "streams ended before the reload"

            results = await asyncio.wait_for(asyncio.gather(*tasks), 15)
        for status, text in results:
            assert status == 200
            assert text.endswith("data: [DONE]\n\n"), text[-200:]
            assert all(f"from old {i} " in text for i in range(20)), text
        assert len(old.posts()) == 50
        for _ in range(40):  # each sets `completed` after its last write
            if all(s.completed for s in old.posts()):
                break
            await asyncio.sleep(0.05)
        assert all(s.completed for s in old.posts())
        assert len(new.posts()) == 5
        assert "Traceback" not in proc.log()


# 4. Workers.


@pytest.mark.multiproc
@pytest.mark.slow
def test_sighup_to_the_supervisor_reloads_every_worker(
    spawn_edge: SpawnEdge,
    redis_server: RedisServer,
    make_key: MakeKey,
    one: NamedUpstream,
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "edge.toml", config_text(one, 1000))
    proc = start(spawn_edge, redis_server, config, args=("--workers", "2"))
    assert wait_until(lambda: len(workers_of(proc.pid)) == 2, 10)
    workers = workers_of(proc.pid)
    key, _ = make_key("free")
    assert {limit_seen(proc.url, key, fresh=True) for _ in range(10)} == {"1000"}

    write_config(config, config_text(one, 1300))
    os.kill(proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    streak = 0
    while streak < 20 and time.monotonic() < deadline:  # 20 fresh connections in a row
        streak = streak + 1 if limit_seen(proc.url, key, fresh=True) == "1300" else 0
    assert streak == 20, "the workers did not all reload"
    seen = [limit_seen(proc.url, key, fresh=True) for _ in range(40)]
    assert seen == ["1300"] * 40
    assert workers_of(proc.pid) == workers  # reloaded, not restarted
