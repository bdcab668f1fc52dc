"""edge as it is deployed: worker processes on one port, an admin listener, the SIGTERM drain
(T21 in docs/testplan.md) and forwarding headers believed only from trusted proxies.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from edge.control.records import KeyRecord
from tests.support.edge_process import EdgeProcess, auth, edge_env
from tests.support.fake_upstream import FakeUpstream
from tests.support.metrics import scrape, value
from tests.support.ports import free_port
from tests.support.procinfo import accepted_by, workers_of
from tests.support.raw_http import request_head
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.multiproc
MakeKey = Callable[..., tuple[str, KeyRecord]]
Spawn = Callable[..., EdgeProcess]
ADMIN_TOKEN = "deploy-admin-token-0123456789"


def fresh_connection_get(url: str, key: str) -> int:
    """One request on a new connection, so the kernel may hand it to any worker."""
    with httpx.Client(timeout=10) as client:
        return client.get(url, headers={**auth(key), "Connection": "close"}).status_code


def test_workers_share_the_port_sum_their_metrics_and_are_replaced(
    spawn_edge: Spawn, redis_server: RedisServer, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    proc = spawn_edge(edge_env(redis_server.url, upstream.url), args=("--workers", "2"))
    assert wait_until(lambda: len(workers_of(proc.pid)) == 2, 10)
    first = workers_of(proc.pid)
    metrics_dir = Path(
        dict(
            line.split("=", 1)
            for line in Path(f"/proc/{first[0]}/environ").read_text().split("\0")
            if "=" in line
        )["PROMETHEUS_MULTIPROC_DIR"]
    )
    assert metrics_dir.is_dir()

    key, _ = make_key("team")
    before = value(scrape(proc.url), "edge_requests_total", plan="team", outcome="allowed")
    assert [fresh_connection_get(f"{proc.url}/v1/models", key) for _ in range(40)] == [200] * 40

    def counted() -> float:
        return value(scrape(proc.url), "edge_requests_total", plan="team", outcome="allowed")

    # Each worker hands its counts to the shared files every 0.1 s (edge/metrics/batch.py):
    assert wait_until(lambda: counted() - before == 40, 2)
    for _ in range(4):  # whichever worker answers /metrics reports the sum over both
        assert counted() - before == 40
    assert wait_until(lambda: value(scrape(proc.url), "edge_inflight_requests") == 0, 2)
    assert value(scrape(proc.url), "edge_plan_limit", plan="free", window="minute") == 20

    limited, _ = make_key("free", rpm=20)
    statuses = Counter(fresh_connection_get(f"{proc.url}/v1/models", limited) for _ in range(30))
    assert statuses == {200: 20, 429: 10}

    os.kill(first[0], signal.SIGKILL)
    assert wait_until(
        lambda: len(workers_of(proc.pid)) == 2 and first[0] not in workers_of(proc.pid), 15
    )
    assert fresh_connection_get(f"{proc.url}/v1/models", key) == 200
    assert wait_until(lambda: counted() - before >= 41, 2)  # the dead worker's counts stay
    assert wait_until(lambda: value(scrape(proc.url), "edge_inflight_requests") == 0, 2)

    assert proc.stop() == 0
    assert not metrics_dir.exists()
    assert workers_of(proc.pid) == []


def test_workers_each_take_a_share_of_persistent_connections(
    spawn_edge: Spawn, redis_server: RedisServer, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    """32 keep-alive connections opened at once (a load balancer's pool, wrk's) spread over
    both workers. With one shared listening socket the first worker to wake accepted all 32
    and the second idled; each worker now has its own SO_REUSEPORT socket."""
    proc = spawn_edge(edge_env(redis_server.url, upstream.url), args=("--workers", "2"))
    assert wait_until(lambda: len(workers_of(proc.pid)) == 2, 10)
    key, _ = make_key("team")
    port = int(proc.url.rsplit(":", 1)[1])
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(32)]
    try:
        for sock in socks:  # one request each: accepted and served, the connection kept
            sock.sendall(request_head(port, key, "GET /v1/models HTTP/1.1"))
        for sock in socks:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        held = accepted_by(workers_of(proc.pid), port)
        assert sum(held.values()) == 32
        assert min(held.values()) >= 4, held  # a hash spread, not an even one
    finally:
        for sock in socks:
            sock.close()
    # SO_REUSEPORT must not let a second edge share the port silently: it is refused.
    env = {**os.environ, **edge_env(redis_server.url, upstream.url)}
    second = subprocess.run(
        [sys.executable, "-m", "edge", "serve", "--workers", "2", "--port", str(port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode != 0 and "cannot listen" in second.stderr, second.stderr


def test_the_admin_listener_takes_admin_dashboard_and_metrics(
    spawn_edge: Spawn, redis_server: RedisServer, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    admin_port = free_port()
    env = edge_env(redis_server.url, upstream.url, EDGE_ADMIN_TOKEN=ADMIN_TOKEN)
    proc = spawn_edge(env, args=("--admin-port", str(admin_port)))
    admin = f"http://127.0.0.1:{admin_port}"
    key, _ = make_key()
    token = auth(ADMIN_TOKEN)
    with httpx.Client(timeout=10) as client:
        for path in ("/admin/keys", "/admin/", "/metrics"):
            resp = client.get(proc.url + path, headers=token)
            assert resp.status_code == 404, path
            assert resp.headers["content-type"] == "application/json"
        assert client.get(f"{proc.url}/v1/models", headers=auth(key)).status_code == 200
        assert client.get(f"{admin}/admin/keys", headers=token).status_code == 200
        assert client.get(f"{admin}/admin/").headers["content-type"].startswith("text/html")
        assert "edge_requests_total" in client.get(f"{admin}/metrics").text
        assert client.get(f"{admin}/v1/models", headers=auth(key)).status_code == 404
        for base in (proc.url, admin):
            assert client.get(f"{base}/healthz").status_code == 200
            assert client.get(f"{base}/readyz").status_code == 200
    assert f"admin API, dashboard and /metrics on http://127.0.0.1:{admin_port}" in proc.log()


class Stream(threading.Thread):
    """A streaming request read to its end in the background."""

    def __init__(self, url: str, key: str, chunks: int, gap_ms: int) -> None:
        super().__init__(daemon=True)
        self.url, self.key, self.chunks, self.gap_ms = url, key, chunks, gap_ms
        self.body = b""
        self.error: Exception | None = None

    def run(self) -> None:
        headers = auth(
            self.key, **{"x-fake-chunks": str(self.chunks), "x-fake-gap-ms": str(self.gap_ms)}
        )
        try:
            with (
                httpx.Client(timeout=90) as client,
                client.stream("GET", f"{self.url}/v1/models", headers=headers) as resp,
            ):
                for chunk in resp.iter_raw():
                    self.body += chunk
        except Exception as exc:
            self.error = exc


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_drain_completes_streams(
    spawn_edge: Spawn, redis_server: RedisServer, upstream: FakeUpstream, make_key: MakeKey,
    workers: str,
) -> None:  # fmt: skip
    """T21: SIGTERM → /readyz 503 at once; requests still served for the drain delay; the
    in-flight stream ends with [DONE]; the process exits 0 before the drain timeout."""
    env = edge_env(
        redis_server.url, upstream.url,
        EDGE_SERVER_DRAIN_DELAY="1.5", EDGE_SERVER_DRAIN_TIMEOUT="4", EDGE_SERVER_WORKERS=workers,
    )  # fmt: skip
    proc = spawn_edge(env, name=f"drain-{workers}")
    key, _ = make_key("team")
    stream = Stream(proc.url, key, chunks=10, gap_ms=250)  # about 2.5 s
    stream.start()
    time.sleep(0.5)
    signalled = time.monotonic()
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: httpx.get(f"{proc.url}/readyz").status_code == 503, 1, every=0.02)
    assert time.monotonic() - signalled < 0.5
    for _ in range(3):  # still served during the delay
        assert httpx.get(f"{proc.url}/v1/models", headers=auth(key)).status_code == 200
    code = proc.proc.wait(10)
    stream.join(10)
    assert stream.error is None
    assert stream.body.endswith(b"data: [DONE]\n\n")
    assert code == 0
    assert time.monotonic() - signalled < 1.5 + 4
    assert "Traceback" not in proc.log()


@pytest.mark.slow
def test_a_stream_longer_than_the_drain_timeout_is_ended_and_the_process_exits(
    spawn_edge: Spawn, redis_server: RedisServer, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    env = edge_env(
        redis_server.url,
        upstream.url,
        EDGE_SERVER_DRAIN_DELAY="0.5",
        EDGE_SERVER_DRAIN_TIMEOUT="1.5",
    )
    proc = spawn_edge(env, name="drain-long")
    key, _ = make_key("team")
    stream = Stream(proc.url, key, chunks=600, gap_ms=100)  # a minute
    stream.start()
    time.sleep(0.5)
    signalled = time.monotonic()
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGTERM)
    code = proc.proc.wait(10)
    elapsed = time.monotonic() - signalled
    stream.join(10)
    assert code == 0
    assert 0.5 + 1.5 <= elapsed < 0.5 + 1.5 + 3
    assert not stream.body.endswith(b"data: [DONE]\n\n")  # ended, visibly incomplete
    assert not stream.is_alive()


def test_forwarding_headers_only_from_trusted_proxies(
    spawn_edge: Spawn, redis_server: RedisServer, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key("team")
    trusting = spawn_edge(
        edge_env(redis_server.url, upstream.url, EDGE_SERVER_TRUSTED_PROXIES="127.0.0.0/8"),
        name="trusting",
    )
    wary = spawn_edge(edge_env(redis_server.url, upstream.url), name="wary")
    claimed = {
        "X-Forwarded-For": "6.6.6.6",
        "X-Forwarded-Proto": "https",
        "Forwarded": "for=6.6.6.6",
        "X-Real-IP": "6.6.6.6",
    }
    for proc in (trusting, wary):
        resp = httpx.get(f"{proc.url}/v1/models", headers=auth(key, **claimed))
        assert resp.status_code == 200
    believed, ignored = upstream.records
    assert believed.headers("x-forwarded-for") == ["6.6.6.6, 127.0.0.1"]
    assert believed.headers("x-forwarded-proto") == ["https"]
    assert believed.headers("forwarded") == ["for=6.6.6.6"]
    assert ignored.headers("x-forwarded-for") == ["127.0.0.1"]
    assert ignored.headers("x-forwarded-proto") == ["http"]
    assert ignored.headers("forwarded") == [] and ignored.headers("x-real-ip") == []
