"""The access log (`log.access`, edge/proxy/access.py) through a real edge process: one JSON
line per /v1 request with exactly the documented fields and values that match what crossed
the wire, and no secret in the whole log at any level (the key, its secret part, its hash, the
admin token, the provider key, a query string). In process: the client address behind trusted
proxies, and owners looked up once per key, not once per request."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from edge.control.records import KeyRecord
from edge.keys import record_key
from edge.logs import LineWriter
from edge.proxy.access import AccessLog, client_address
from edge.proxy.policy import TrustedProxies
from tests.support.edge_process import PROVIDER_KEY, EdgeProcess, auth, edge_env
from tests.support.fake_upstream import FakeUpstream
from tests.support.keys import secret_part
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

MakeKey = Callable[..., tuple[str, KeyRecord]]
TOKEN = f"admin-{secrets.token_hex(16)}"
FIELDS = {
    "time", "key", "plan", "owner", "client", "method", "path", "model", "status", "outcome",
    "request_bytes", "response_bytes", "duration_ms", "upstream_ttfb_ms", "input_tokens",
    "output_tokens", "request_id", "upstream_request_id",
}  # fmt: skip
PRICES = '[{"match": "unit-*", "input": 1000000, "output": 1000000}]'


@pytest.fixture(scope="module")
def logged(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    fake_upstream_server: FakeUpstream,
) -> Iterator[EdgeProcess]:
    """An edge with the access log on, debug logging, trusting loopback as a proxy."""
    env = edge_env(
        redis_server.url,
        fake_upstream_server.url,
        EDGE_LOG_ACCESS="true",
        EDGE_LOG_LEVEL="debug",
        EDGE_ADMIN_TOKEN=TOKEN,
        EDGE_PRICING_MODELS=PRICES,
        EDGE_SERVER_TRUSTED_PROXIES="127.0.0.0/8",
    )
    proc = EdgeProcess(tmp_path_factory.mktemp("access"), env, "access").start()
    yield proc
    proc.stop()


def lines(proc: EdgeProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.log().splitlines() if line.startswith('{"time"')]


def line_for(proc: EdgeProcess, marker: str, count: int = 1) -> list[dict[str, Any]]:
    """The access lines whose path is `marker` (each test uses its own path)."""
    found: list[dict[str, Any]] = []

    def seen() -> bool:
        found[:] = [line for line in lines(proc) if line["path"] == marker]
        return len(found) >= count

    assert wait_until(seen, 5), f"no access line for {marker} in {proc.log()[-2000:]}"
    return found


def test_a_line_per_request_with_the_documented_fields(
    logged: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, rec = make_key("pro", owner="acme-access")
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
    resp = httpx.post(
        f"{logged.url}/v1/chat/completions?trace=1",
        headers={
            **auth(key, **{"x-fake-header": "x-request-id: req_abc123"}),
            "x-forwarded-for": "203.0.113.7",
        },
        content=body,
    )
    assert resp.status_code == 200
    [line] = line_for(logged, "/v1/chat/completions")[-1:]  # the query string is not logged
    assert set(line) == FIELDS
    assert (line["key"], line["plan"], line["owner"]) == (rec.id, "pro", "acme-access")
    assert (line["method"], line["path"], line["status"], line["outcome"]) == (
        "POST", "/v1/chat/completions", 200, "allowed",
    )  # fmt: skip
    assert line["client"] == "203.0.113.7"  # what the trusted proxy (loopback) reported
    assert line["request_bytes"] == len(body)
    assert line["response_bytes"] == len(resp.content)
    assert line["upstream_request_id"] == "req_abc123"
    assert 0 < line["upstream_ttfb_ms"] <= line["duration_ms"]
    assert line["model"] is None  # an unmetered, unscoped key's body is never read
    assert line["input_tokens"] is None and line["output_tokens"] is None
    assert line["time"].endswith("Z") and len(line["time"]) == len("2026-12-04T00:00:00.000Z")


def test_edge_s_own_answers_and_streams_are_logged_as_sent(
    logged: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, rec = make_key("free", rpm=1)
    first = httpx.get(f"{logged.url}/v1/models", headers=auth(key))
    limited = httpx.get(f"{logged.url}/v1/models", headers=auth(key))
    stranger = httpx.get(f"{logged.url}/v1/models", headers=auth("gw_sk_nope"))
    assert (first.status_code, limited.status_code, stranger.status_code) == (200, 429, 401)
    got = line_for(logged, "/v1/models", 3)[-3:]
    assert [(g["status"], g["outcome"]) for g in got] == [
        (200, "allowed"), (429, "rate_limited_minute"), (401, "unauthorized"),
    ]  # fmt: skip
    assert [g["response_bytes"] for g in got] == [
        len(first.content), len(limited.content), len(stranger.content),
    ]  # fmt: skip
    assert got[1]["key"] == rec.id and got[2]["key"] is None and got[2]["plan"] is None

    streamer, _ = make_key("pro")
    with httpx.stream(
        "POST",
        f"{logged.url}/v1/completions",
        headers=auth(streamer, **{"x-fake-chunks": "5"}),
        content=b'{"model": "m", "prompt": "x", "stream": true}',
    ) as resp:
        received = resp.read()
    [line] = line_for(logged, "/v1/completions")[-1:]
    assert (line["status"], line["response_bytes"]) == (200, len(received))


def test_a_metered_request_s_line_has_its_model_and_tokens(
    logged: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key("pro", credits=1000)
    resp = httpx.post(
        f"{logged.url}/v1/embeddings",
        headers=auth(key),
        content=b'{"model": "unit-e", "input": "a b c"}',
    )
    assert resp.status_code == 200
    usage = resp.json()["usage"]
    [line] = line_for(logged, "/v1/embeddings")[-1:]
    assert line["model"] == "unit-e"
    assert (line["input_tokens"], line["output_tokens"]) == (usage["prompt_tokens"], 0)


def test_no_secret_reaches_the_log_at_any_level(
    logged: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, rec = make_key("pro", owner="secrecy")
    admin = {"Authorization": f"Bearer {TOKEN}"}
    calls = [
        httpx.post(
            f"{logged.url}/v1/chat/completions?session=qs-{secrets.token_hex(4)}",
            headers=auth(key),
            content=b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}',
        ),
        httpx.get(f"{logged.url}/v1/models", headers=auth(key[:-1] + "x")),  # bad checksum
        httpx.get(f"{logged.url}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}),
        httpx.get(f"{logged.url}/admin/keys/{rec.id}", headers=admin),
        httpx.post(f"{logged.url}/admin/keys/{rec.id}/rotate", headers=admin, json={}),
    ]  # fmt: skip
    rotated = calls[-1].json()["key"]
    httpx.get(f"{logged.url}/v1/models", headers=auth(rotated))
    assert [c.status_code for c in calls] == [200, 401, 401, 200, 200]
    line_for(logged, "/v1/models", 3)
    text = logged.log()
    for label, secret in {
        "key": key,
        "key's secret": secret_part(key),
        "rotated key": rotated,
        "key hash": hashlib.sha256(key.encode()).hexdigest(),
        "admin token": TOKEN,
        "provider key": PROVIDER_KEY,
        "query string": "session=qs-",
    }.items():
        assert secret not in text, f"the log holds the {label}"


def test_the_client_is_the_trusted_proxy_s_report_and_only_then() -> None:
    trusted = TrustedProxies(("10.0.0.0/8",))
    chain = [(b"x-forwarded-for", b"198.51.100.1, 203.0.113.9"), (b"x-forwarded-for", b"10.0.0.2")]
    assert client_address("10.0.0.1", chain, trusted) == "203.0.113.9"  # last untrusted hop
    assert client_address("192.0.2.5", chain, trusted) == "192.0.2.5"  # not a trusted peer
    assert client_address("10.0.0.1", [], trusted) == "10.0.0.1"
    assert client_address(None, chain, trusted) is None


class CountingClient:
    """Just enough of a Redis client for the owner look-ups: counts its round trips."""

    def __init__(self, owners: dict[str, str]) -> None:
        self.owners = owners
        self.round_trips = 0

    def pipeline(self, transaction: bool = True) -> Any:
        client = self

        class Pipe:
            def __init__(self) -> None:
                self.names: list[str] = []

            def hget(self, name: str, field: str) -> None:
                self.names.append(name)

            async def execute(self) -> list[Any]:
                client.round_trips += 1
                await asyncio.sleep(0)
                return [client.owners.get(n, "").encode() or None for n in self.names]

        return Pipe()


def test_owners_are_looked_up_once_per_key_not_per_request(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def scenario() -> list[str]:
        client = CountingClient({record_key("k1"): "acme", record_key("k2"): "globex"})
        access = AccessLog(client)  # type: ignore[arg-type]
        access.start()
        try:
            for i in range(50):
                access.add({"n": i}, "k1" if i % 2 else "k2")
            access.add({"n": 50}, None)
            await asyncio.sleep(0.01)
            for i in range(51, 60):
                access.add({"n": i}, "k1")
            assert client.round_trips == 1  # one pipelined look-up for both keys, then cached
        finally:
            await access.close()
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]

    written = [json.loads(line) for line in asyncio.run(scenario())]
    assert sorted(w["n"] for w in written) == list(range(60))
    owners = {w["n"]: w["owner"] for w in written}
    assert owners[1] == "acme" and owners[2] == "globex" and owners[50] is None
    assert owners[59] == "acme"


def test_the_line_writer_keeps_every_line_in_order_and_counts_what_it_drops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("edge.test-lines")
    writer = LineWriter(logger)
    writer.MOST_WAITING = 1_000  # type: ignore[misc]
    with caplog.at_level(logging.INFO):
        writer.start()
        for i in range(600):  # past FLUSH_LINES: the thread is woken before its 0.1 s
            writer.add(b'{"n": %d}' % i)
        assert wait_until(lambda: not writer._lines, 2)
        writer._stopping = True  # hold the thread: what follows waits for stop()
        writer._wake.set()
        writer._thread.join(2)
        for i in range(600, 1_700):
            writer.add(b'{"n": %d}' % i)
        writer.stop()
    written = [
        json.loads(line)["n"]
        for record in caplog.records
        if record.name == logger.name
        for line in record.getMessage().splitlines()
    ]
    assert written == list(range(1_600))  # 1,000 waiting at most: the last 100 dropped
    assert any("100 lines dropped" in r.getMessage() for r in caplog.records)
    assert len([r for r in caplog.records if r.name == logger.name]) < 10  # many per record
