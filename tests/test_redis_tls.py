"""Edge over `rediss://` (`EDGE_REDIS_URL`, docs/configuration.md): a redis-server with TLS only and
a private CA. The URL's TLS options (`ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`, `ssl_cert_reqs`)
must reach every Redis client edge has, the CLI's, the request path's and the one `/readyz` asks, so
that readiness says what the requests will get."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import redis

from edge.keys import record_key
from tests.support.edge_process import EdgeProcess, auth, edge_env, run_cli
from tests.support.fake_upstream import FakeUpstream
from tests.support.keys import new_key
from tests.support.tls import Certs, TlsRedisServer, make_certs, rediss_url

pytestmark = pytest.mark.multiproc

Spawn = Callable[..., EdgeProcess]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[TlsRedisServer]:
    """TLS only, server certificate from the private CA, no client certificate asked."""
    server = TlsRedisServer(tmp_path_factory.mktemp("redis-tls"), certs).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_redis(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[TlsRedisServer]:
    """TLS only, and a client certificate signed by the private CA required."""
    directory = tmp_path_factory.mktemp("redis-mtls")
    server = TlsRedisServer(directory, certs, auth_clients=True).start()
    yield server
    server.stop()


def cli_create(url: str) -> tuple[str, str]:
    """(key, kid) from `edge keys create --json` run against `url`."""
    done = run_cli("keys", "create", "--plan", "free", "--json", redis_url=url)
    assert done.returncode == 0, done.stderr
    created = json.loads(done.stdout)
    return created["key"], created["id"]


def models_and_ready(proc: EdgeProcess, key: str) -> tuple[httpx.Response, httpx.Response]:
    with httpx.Client(base_url=proc.url, timeout=10) as client:
        return client.get("/v1/models", headers=auth(key)), client.get("/readyz")


def redis_complaints(proc: EdgeProcess) -> str:
    """Edge's log lines about Redis, for assertion messages."""
    return "\n".join(line for line in proc.log().splitlines() if "Redis" in line)


def assert_serves_over(
    server: TlsRedisServer, url: str, spawn_edge: Spawn, upstream: FakeUpstream
) -> None:
    """The CLI creates a key on the TLS Redis; an edge on `url` admits it and is ready."""
    key, kid = cli_create(url)
    with server.client() as check:
        assert check.exists(record_key(kid)), "the CLI wrote somewhere else"
    proc = spawn_edge(edge_env(url, upstream.url), name="edge-tls")
    models, ready = models_and_ready(proc, key)
    # both at once: the defect shows as (503, 200), ready while every request fails
    assert (models.status_code, ready.status_code) == (200, 200), redis_complaints(proc)
    assert [rec.path for rec in upstream.records] == ["/v1/models"]
    assert key not in proc.log()


def test_server_tls_with_private_ca(
    tls_redis: TlsRedisServer, spawn_edge: Spawn, upstream: FakeUpstream
) -> None:
    """`rediss://…?ssl_ca_certs=<private CA>`: CLI, request path and /readyz all verify the
    server against that CA (not the system store): key created, 200, ready."""
    assert_serves_over(tls_redis, tls_redis.url, spawn_edge, upstream)


def test_mutual_tls_client_certificate(
    mtls_redis: TlsRedisServer, certs: Certs, spawn_edge: Spawn, upstream: FakeUpstream
) -> None:
    """`--tls-auth-clients yes`: the client cert and key from the URL (`ssl_certfile`,
    `ssl_keyfile`) are presented by every client: key created, 200, ready."""
    without_cert = redis.Redis.from_url(
        rediss_url(mtls_redis.port, ssl_ca_certs=certs.ca_cert), socket_timeout=5
    )
    with without_cert, pytest.raises(redis.ConnectionError):
        without_cert.ping()  # the server really does require a client certificate
    assert_serves_over(mtls_redis, mtls_redis.url, spawn_edge, upstream)


def test_wrong_ca_fails_closed_fast_and_not_ready(
    tls_redis: TlsRedisServer, certs: Certs, spawn_edge: Spawn, upstream: FakeUpstream
) -> None:
    """`ssl_ca_certs` = an unrelated CA: every request is a fast (< 1 s) 503
    `service_unavailable`, the upstream sees nothing, and /readyz is 503 too."""
    key, _ = new_key(tls_redis.url, "free")
    wrong = rediss_url(tls_redis.port, ssl_ca_certs=certs.other_ca_cert)
    proc = spawn_edge(edge_env(wrong, upstream.url), name="edge-wrong-ca")
    with httpx.Client(base_url=proc.url, headers=auth(key), timeout=10) as client:
        latencies = []
        for _ in range(5):
            start = time.perf_counter()
            resp = client.get("/v1/models")
            latencies.append(time.perf_counter() - start)
            assert resp.status_code == 503, resp.text
            assert resp.headers["content-type"] == "application/json"
            assert resp.json()["error"]["type"] == "service_unavailable"
        assert max(latencies) < 1.0, latencies
        ready = client.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert ready.json()["error"]["type"] == "service_unavailable"
    assert upstream.records == []
    assert key not in proc.log()


def test_cert_reqs_none_is_honoured(
    tls_redis: TlsRedisServer, spawn_edge: Spawn, upstream: FakeUpstream
) -> None:
    """`rediss://…?ssl_cert_reqs=none` and no CA: the URL's options are used (no verification),
    not a default context that rejects the private CA: 200, ready."""
    url = rediss_url(tls_redis.port, ssl_cert_reqs="none")
    key, _ = new_key(url, "free")
    proc = spawn_edge(edge_env(url, upstream.url), name="edge-no-verify")
    models, ready = models_and_ready(proc, key)
    assert (models.status_code, ready.status_code) == (200, 200), redis_complaints(proc)
    assert [rec.path for rec in upstream.records] == ["/v1/models"]
    assert key not in proc.log()
