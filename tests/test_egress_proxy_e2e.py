"""Egress through a company's proxy: `upstream.proxy` (EDGE_UPSTREAM_PROXY, per `[[upstreams]]`
entry too) and, when it is empty, HTTPS_PROXY / HTTP_PROXY / NO_PROXY, against Debian's
tinyproxy started by the tests (tests/support/tinyproxy.py), whose log shows what went
through it:

- an https upstream through a `CONNECT host:port` tunnel, its certificate still checked
  against the private CA (EDGE_UPSTREAM_CA_FILE);
- an http upstream through the proxy in absolute form (`POST http://host:port/v1/… HTTP/1.1`),
  the upstream getting the right path and the provider's key;
- NO_PROXY=127.0.0.1 goes direct; EDGE_UPSTREAM_PROXY wins over HTTPS_PROXY;
  EDGE_UPSTREAM_PROXY=direct ignores the environment;
- credentials in the proxy URL reach the proxy (BasicAuth) and never the upstream or the log;
  none or wrong ones (a refused CONNECT, or a 407 to an absolute-form request), or a proxy
  that cannot be reached: 502, a log line with the proxy's answer, the credit refunded.

One edge per configuration (edge throttles its upstream error lines to one a second per kind),
all started together; the proxy variables of the runner's own environment are removed for the
module, and the tests' clients never read them (`trust_env=False`).
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from edge.control.records import KeyRecord
from edge.keys import record_key
from tests.support.edge_process import PROVIDER_KEY, EdgeProcess, auth, edge_env
from tests.support.fake_upstream import FakeUpstream
from tests.support.fleet import Fleet, clean_proxy_env, log_lines
from tests.support.keys import new_key, secret_part
from tests.support.named_upstream import edge_config, edge_env_for, write_config
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer
from tests.support.tinyproxy import TinyProxy
from tests.support.tls import Certs, make_certs
from tests.support.tls_upstream import TlsUpstream
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

PROXY_USER = "edge-egress"
PROXY_PASSWORD = "Pr0xyPassw0rd-7f3a9c"
WRONG_PASSWORD = "WrongPassw0rd-51d2e8"


def chat(model: str = "gpt-4o") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module", autouse=True)
def no_runner_proxies() -> Iterator[None]:
    with clean_proxy_env():
        yield


@pytest.fixture(scope="module")
def dead_port() -> int:
    """A loopback port nothing listens on."""
    return free_port()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("proxy-certs"))


@pytest.fixture(scope="module")
def tls(certs: Certs) -> Iterator[TlsUpstream]:
    server = TlsUpstream("tls", certs).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyProxy]:
    """An open proxy (no credentials asked)."""
    server = TinyProxy(tmp_path_factory.mktemp("tinyproxy")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def auth_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyProxy]:
    """A proxy that asks for `Proxy-Authorization: Basic` (BasicAuth user password)."""
    directory = tmp_path_factory.mktemp("tinyproxy-auth")
    server = TinyProxy(directory, basic_auth=(PROXY_USER, PROXY_PASSWORD)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    certs: Certs,
    tls: TlsUpstream,
    fake_upstream_server: FakeUpstream,
    proxy: TinyProxy,
    auth_proxy: TinyProxy,
    no_runner_proxies: None,
    dead_port: int,
) -> Iterator[Fleet]:
    directory = tmp_path_factory.mktemp("egress")
    ca = str(certs.ca_cert)
    fake = fake_upstream_server.url
    dead = f"http://127.0.0.1:{dead_port}"
    with_credentials = auth_proxy.url_with(PROXY_USER, PROXY_PASSWORD)
    entries = edge_config(
        [
            {"name": "tls", "url": tls.url, "ca_file": ca, "proxy": with_credentials,
             "models": ["tls-*"]},
            {"name": "plain", "url": fake, "proxy": with_credentials, "models": ["plain-*"]},
            {"name": "anonymous", "url": tls.url, "ca_file": ca, "proxy": auth_proxy.url,
             "models": ["anonymous-*"]},
        ]
    )  # fmt: skip
    config = write_config(directory / "entries.toml", entries)

    def env(upstream_url: str, **extra: str) -> dict[str, str]:
        return edge_env(redis_server.url, upstream_url, **extra)

    wrong = auth_proxy.url_with(PROXY_USER, WRONG_PASSWORD)
    envs = {
        "https": env(tls.url, EDGE_UPSTREAM_CA_FILE=ca, HTTPS_PROXY=proxy.url),
        "http": env(fake, HTTP_PROXY=proxy.url),
        "no-proxy": env(fake, HTTP_PROXY=proxy.url, HTTPS_PROXY=proxy.url, NO_PROXY="127.0.0.1"),
        "explicit": env(tls.url, EDGE_UPSTREAM_CA_FILE=ca, HTTPS_PROXY=dead,
                        EDGE_UPSTREAM_PROXY=proxy.url),
        "direct": env(tls.url, EDGE_UPSTREAM_CA_FILE=ca, HTTPS_PROXY=proxy.url,
                      HTTP_PROXY=proxy.url, EDGE_UPSTREAM_PROXY="direct"),
        "wrong-credentials": env(tls.url, EDGE_UPSTREAM_CA_FILE=ca, EDGE_UPSTREAM_PROXY=wrong),
        "http-no-credentials": env(fake, HTTP_PROXY=auth_proxy.url),
        "unreachable-proxy": env(tls.url, EDGE_UPSTREAM_CA_FILE=ca, EDGE_UPSTREAM_PROXY=dead),
        "entries": edge_env_for(redis_server.url, config, EDGE_LOG_LEVEL="debug"),
    }  # fmt: skip
    fleet = Fleet(directory).start(envs)
    yield fleet
    fleet.stop()


@pytest.fixture(scope="module")
def key(redis_server: RedisServer) -> tuple[str, KeyRecord]:
    return new_key(redis_server.url, "pro")


def post_chat(proc: EdgeProcess, key: str, model: str = "gpt-4o") -> httpx.Response:
    with httpx.Client(base_url=proc.url, timeout=15, trust_env=False) as client:
        return client.post("/v1/chat/completions", headers=auth(key), json=chat(model))


def connects_to(proxy: TinyProxy, since: int, port: int) -> list[str]:
    pattern = re.compile(rf"CONNECT (127\.0\.0\.1|localhost):{port} HTTP/1\.[01]$")
    return [line for line in proxy.requests()[since:] if pattern.match(line)]


def traffic(proxy: TinyProxy) -> list[str]:
    """The proxy's log lines for connections accepted and requests read."""
    return [
        line
        for line in proxy.log().splitlines()
        if "Connect (file descriptor" in line or "Request (file descriptor" in line
    ]


def assert_nothing_new(proxy: TinyProxy, before: list[str]) -> None:
    time.sleep(0.2)  # tinyproxy logs as it accepts and reads: a request would show by now
    assert traffic(proxy) == before, traffic(proxy)[len(before) :]


def assert_no_secrets(proc: EdgeProcess, key: str, *secrets: str) -> None:
    log = proc.log()
    assert "Traceback" not in log, log
    for secret in (key, secret_part(key), *secrets):
        assert secret not in log, f"{secret!r} in edge's log"


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def test_https_upstream_through_a_connect_tunnel(
    fleet: Fleet, proxy: TinyProxy, tls: TlsUpstream, key: tuple[str, KeyRecord]
) -> None:
    """HTTPS_PROXY: the proxy gets `CONNECT 127.0.0.1:<upstream port>`, TLS to the upstream
    runs inside it (verified against EDGE_UPSTREAM_CA_FILE), and the upstream gets the request
    with the provider's key and no Proxy-Authorization."""
    proc = fleet["https"]
    since, before = len(proxy.requests()), len(tls.records)
    resp = post_chat(proc, key[0])
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-upstream-name"] == "tls"
    assert wait_until(lambda: connects_to(proxy, since, tls.port), 3), proxy.requests()[since:]
    [seen] = tls.records[before:]
    assert seen.path == "/v1/chat/completions"
    assert seen.header("authorization") == f"Bearer {PROVIDER_KEY}"
    assert seen.header("proxy-authorization") is None
    assert_no_secrets(proc, key[0])


def test_http_upstream_through_the_absolute_form(
    fleet: Fleet, proxy: TinyProxy, upstream: FakeUpstream, key: tuple[str, KeyRecord]
) -> None:
    """HTTP_PROXY: the proxy reads `POST http://127.0.0.1:<port>/v1/chat/completions`, and
    the upstream gets the request from the proxy (tinyproxy's Via) with the right path and the
    provider's key, never a Proxy-Authorization."""
    proc = fleet["http"]
    since = len(proxy.requests())
    resp = post_chat(proc, key[0])
    assert resp.status_code == 200, resp.text
    wanted = f"POST http://127.0.0.1:{upstream.port}/v1/chat/completions HTTP/1.1"
    assert wait_until(lambda: wanted in proxy.requests()[since:], 3), proxy.requests()[since:]
    [seen] = upstream.records
    assert seen.path == "/v1/chat/completions"
    assert seen.header("authorization") == f"Bearer {PROVIDER_KEY}"
    assert "tinyproxy" in (seen.header("via") or ""), seen.raw_headers
    assert seen.header("proxy-authorization") is None
    assert_no_secrets(proc, key[0])


def test_no_proxy_goes_direct(
    fleet: Fleet, proxy: TinyProxy, upstream: FakeUpstream, key: tuple[str, KeyRecord]
) -> None:
    """HTTP_PROXY and HTTPS_PROXY set, NO_PROXY=127.0.0.1: straight to the upstream (no Via),
    and the proxy's log shows nothing new."""
    proc = fleet["no-proxy"]
    before = traffic(proxy)
    resp = post_chat(proc, key[0])
    assert resp.status_code == 200, resp.text
    [seen] = upstream.records
    assert seen.header("via") is None, seen.raw_headers
    assert_nothing_new(proxy, before)


def test_edge_upstream_proxy_wins_over_https_proxy(
    fleet: Fleet, proxy: TinyProxy, tls: TlsUpstream, key: tuple[str, KeyRecord]
) -> None:
    """HTTPS_PROXY names a port nothing listens on, EDGE_UPSTREAM_PROXY the real proxy: 200,
    through EDGE_UPSTREAM_PROXY's CONNECT."""
    proc = fleet["explicit"]
    since = len(proxy.requests())
    resp = post_chat(proc, key[0])
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-upstream-name"] == "tls"
    assert wait_until(lambda: connects_to(proxy, since, tls.port), 3), proxy.requests()[since:]


def test_direct_ignores_the_environment(
    fleet: Fleet, proxy: TinyProxy, tls: TlsUpstream, key: tuple[str, KeyRecord]
) -> None:
    """EDGE_UPSTREAM_PROXY=direct with HTTPS_PROXY and HTTP_PROXY naming a working proxy:
    straight to the upstream, nothing in the proxy's log."""
    proc = fleet["direct"]
    before = traffic(proxy)
    resp = post_chat(proc, key[0])
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-upstream-name"] == "tls"
    assert_nothing_new(proxy, before)


def test_proxy_credentials_reach_the_proxy_only(
    fleet: Fleet,
    auth_proxy: TinyProxy,
    tls: TlsUpstream,
    upstream: FakeUpstream,
    key: tuple[str, KeyRecord],
) -> None:
    """Per-entry `proxy = "http://user:password@…"` against BasicAuth: the https entry through
    CONNECT and the http entry through the absolute form both get 200, the upstreams never see
    Proxy-Authorization or the password, and the log never has the password; an entry whose
    proxy URL has no credentials: 502, the log line names the proxy's 407."""
    proc = fleet["entries"]
    since, before = len(auth_proxy.requests()), len(tls.records)
    through_tls = post_chat(proc, key[0], "tls-1")
    assert through_tls.status_code == 200, through_tls.text
    assert through_tls.headers["x-upstream-name"] == "tls"
    assert wait_until(lambda: connects_to(auth_proxy, since, tls.port), 3), auth_proxy.log()
    plain = post_chat(proc, key[0], "plain-1")
    assert plain.status_code == 200, plain.text
    absolute = f"POST http://127.0.0.1:{upstream.port}/v1/chat/completions HTTP/1.1"
    assert wait_until(lambda: absolute in auth_proxy.requests()[since:], 3), auth_proxy.log()

    token = basic(PROXY_USER, PROXY_PASSWORD)
    seen_headers = [h for s in tls.records[before:] for h in s.raw_headers]
    seen_headers += [
        (n.decode("latin-1"), v.decode("latin-1"))
        for s in upstream.records
        for n, v in s.raw_headers
    ]
    assert len(tls.records[before:]) == 1 and len(upstream.records) == 1
    assert seen_headers
    for name, value in seen_headers:
        assert name.lower() != "proxy-authorization", seen_headers
        assert PROXY_PASSWORD not in value and token not in value, (name, value)

    anonymous = post_chat(proc, key[0], "anonymous-1")
    assert anonymous.status_code == 502, anonymous.text
    assert anonymous.json()["error"]["type"] == "upstream_error"
    assert len(tls.records[before:]) == 1  # the refused one never reached the upstream
    assert_no_secrets(proc, key[0], PROXY_PASSWORD, token)
    assert wait_until(lambda: log_lines(proc, "egress proxy", "407"), 3), proc.log()


def refused(proc: EdgeProcess, redis_server: RedisServer) -> str:
    """A request with a fresh key holding 5 credits, which edge cannot get through its proxy:
    502 `upstream_error`, and the credit it cost comes back. The key."""
    plaintext, record = new_key(redis_server.url, "pro", credits=5)
    try:
        resp = post_chat(proc, plaintext)
    except httpx.HTTPError as exc:
        pytest.fail(f"no 502 but a broken answer: {exc!r}\n{proc.log()[-3000:]}")
    assert resp.status_code == 502, (resp.status_code, resp.headers, resp.text)
    assert resp.json()["error"]["type"] == "upstream_error", resp.text
    with redis.Redis.from_url(redis_server.url) as r:

        def credits() -> bytes | None:
            return r.hget(record_key(record.id), "credits")  # type: ignore[return-value]

        assert wait_until(lambda: credits() == b"5", 3), f"credits: {credits()!r}, not refunded"
    return plaintext


def test_wrong_proxy_credentials_are_a_502_refunded_and_never_logged(
    fleet: Fleet,
    auth_proxy: TinyProxy,
    tls: TlsUpstream,
    redis_server: RedisServer,
) -> None:
    """EDGE_UPSTREAM_PROXY with a wrong password: the proxy refuses the CONNECT; the client gets
    502 `upstream_error`, the request's credit comes back, the upstream saw nothing, the
    password is never in the log (the proxy URL shows as `user:***@`), and edge's log line
    names the proxy's answer."""
    proc = fleet["wrong-credentials"]
    refusal = auth_proxy.answer_to_connect(
        f"127.0.0.1:{tls.port}", (PROXY_USER, WRONG_PASSWORD)
    )  # tinyproxy 1.11 says 401 to wrong credentials (407 to none)
    assert refusal in (401, 403, 407), refusal
    before = len(tls.records)
    plaintext = refused(proc, redis_server)
    assert len(tls.records) == before
    assert_no_secrets(proc, plaintext, WRONG_PASSWORD, basic(PROXY_USER, WRONG_PASSWORD))
    assert f"{PROXY_USER}:***@127.0.0.1:{auth_proxy.port}" in proc.log(), proc.log()
    assert wait_until(lambda: log_lines(proc, "egress proxy", str(refusal)), 3), proc.log()


def test_a_407_to_an_absolute_form_request_is_a_502(
    fleet: Fleet, auth_proxy: TinyProxy, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    """HTTP_PROXY names the proxy that asks for credentials, and the URL has none: its 407
    (an answer only a proxy gives) is not relayed as the upstream's: 502, refunded, the
    upstream saw nothing, the log line names the 407."""
    proc = fleet["http-no-credentials"]
    since = len(auth_proxy.requests())
    plaintext = refused(proc, redis_server)
    wanted = f"POST http://127.0.0.1:{upstream.port}/v1/chat/completions HTTP/1.1"
    assert wanted in auth_proxy.requests()[since:], auth_proxy.requests()[since:]
    assert upstream.records == []
    assert_no_secrets(proc, plaintext)
    assert wait_until(lambda: log_lines(proc, "egress proxy", "407"), 3), proc.log()


def test_a_proxy_that_cannot_be_reached_is_a_502(
    fleet: Fleet, tls: TlsUpstream, dead_port: int, redis_server: RedisServer
) -> None:
    """EDGE_UPSTREAM_PROXY names a port nothing listens on: 502, refunded, the upstream saw
    nothing, and a warning names that proxy."""
    proc = fleet["unreachable-proxy"]
    before = len(tls.records)
    plaintext = refused(proc, redis_server)
    assert len(tls.records) == before
    assert_no_secrets(proc, plaintext)

    def warned() -> list[str]:
        lines = log_lines(proc, "proxy", f"127.0.0.1:{dead_port}")
        return [line for line in lines if "WARNING" in line or "ERROR" in line]

    assert wait_until(warned, 3), proc.log()
