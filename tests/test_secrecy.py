"""T27 `test_key_stored_only_as_hash` (docs/testplan.md; Redis holds only a key's hash): a key
created with the CLI exists in Redis only as its SHA-256 and never shows up in `keys list/show` or
`/metrics`.

`test_key_not_in_debug_log_or_metrics` is the part of T27's secrecy check that reaches the log,
for the paths the session edge can serve (valid, unknown, key in the query string or path,
upstream 500); T28 `test_key_never_logged` extends it to outages and rejections. A key sent in
the URL is refused (400 `api_key_in_url`) and never forwarded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis

from edge import keys
from edge.control.records import KeyRecord
from tests.support.edge_process import PROVIDER_KEY, EdgeProcess, edge_env, run_cli
from tests.support.fake_upstream import FakeUpstream
from tests.support.keys import secret_part
from tests.support.redis_server import RedisServer

FMT = keys.KeyFormat("gw_sk_")
MakeKey = Callable[..., tuple[str, KeyRecord]]


def dump_everything(r: redis.Redis) -> bytes:
    """Every key name and value in the test Redis: structured reads plus the DUMP payload."""
    parts: list[Any] = []
    for name in r.scan_iter(count=1000):
        kind = r.type(name)
        parts.append(name)
        if kind == b"hash":
            for field, value in r.hgetall(name).items():
                parts += [field, value]
        elif kind == b"string":
            parts.append(r.get(name))
        elif kind == b"list":
            parts += r.lrange(name, 0, -1)
        elif kind == b"set":
            parts += r.smembers(name)
        elif kind == b"zset":
            parts += r.zrange(name, 0, -1)
        parts.append(r.dump(name))
    return b"\n".join(p if isinstance(p, bytes) else str(p).encode() for p in parts)


def assert_absent(haystack: str | bytes, secrets: dict[str, str], where: str) -> None:
    text = haystack.decode("latin-1") if isinstance(haystack, bytes) else haystack
    for label, secret in secrets.items():
        assert secret not in text, f"{where} contains the {label}"


def test_key_stored_only_as_hash(
    edge: EdgeProcess,
    upstream: FakeUpstream,
    redis_server: RedisServer,
    r: redis.Redis,
) -> None:
    created = run_cli(
        "keys", "create", "--plan", "free", "--name", "demo", "--json", redis_url=redis_server.url
    )
    assert created.returncode == 0, created.stderr
    answer: dict[str, Any] = json.loads(created.stdout)
    key, kid = answer["key"], answer["id"]
    assert FMT.parse(key.encode()) is not None and kid in key
    secret = secret_part(key)
    digest = hashlib.sha256(key.encode()).hexdigest()
    plaintext = {"key": key, "secret": secret}

    stored = dump_everything(r)
    assert digest.encode() in stored, "the dump must include the new record"
    assert_absent(stored, plaintext, "Redis")
    assert r.hget(keys.record_key(kid), "hash") == digest.encode()

    everything = {**plaintext, "hash": digest}
    listing = run_cli("keys", "list", "--json", redis_url=redis_server.url)
    assert listing.returncode == 0, listing.stderr
    assert kid in {row["id"] for row in json.loads(listing.stdout)}
    shown = run_cli("keys", "show", kid, "--json", redis_url=redis_server.url)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["id"] == kid
    for name, out in (("keys list", listing), ("keys show", shown)):
        assert_absent(out.stdout + out.stderr, everything, name)

    used = httpx.get(f"{edge.url}/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert used.status_code == 200, used.text
    assert_absent(httpx.get(f"{edge.url}/metrics").text, everything, "/metrics")


def test_key_not_in_debug_log_or_metrics(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key()
    unknown = keys.make_key("gw_sk_", keys.new_kid())
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=edge.url, timeout=10) as client:
        assert client.get("/v1/models", headers=auth).status_code == 200
        resp = client.get("/v1/models", headers={"Authorization": f"Bearer {unknown}"})
        assert resp.status_code == 401

        for url in (f"/v1/models?api_key={key}", f"/v1/models/{key}"):
            resp = client.get(url, headers=auth)
            assert resp.status_code == 400, (url, resp.text)
            assert resp.json()["error"]["code"] == "api_key_in_url"
            assert key not in resp.text

        failed = client.post(
            "/v1/chat/completions",
            headers={**auth, "x-fake-status": "500"},
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert failed.status_code == 500
        metrics = client.get("/metrics").text

    forwarded = [(rec.method, rec.path) for rec in upstream.records]
    assert forwarded == [("GET", "/v1/models"), ("POST", "/v1/chat/completions")], (
        "a key in the URL must never be forwarded"
    )
    for rec in upstream.records:
        assert key not in rec.query and key not in rec.path

    forbidden = {
        "key": key,
        "secret": secret_part(key),
        "unknown key": unknown,
        "unknown key's secret": secret_part(unknown),
        "provider key": PROVIDER_KEY,
    }
    assert_absent(metrics, forbidden, "/metrics")
    log = edge.log()
    assert log, "the edge log is empty: nothing was checked"
    assert_absent(log, {**forbidden, "Bearer prefix": "Bearer "}, "the edge log")


ADMIN_TOKEN = "secrecy-admin-token-0123456789"


@pytest.mark.slow
def test_key_never_logged(
    spawn_edge: Callable[..., EdgeProcess], redis_factory: Any, upstream: FakeUpstream
) -> None:
    """T28: at DEBUG, through every path (valid, unknown, revoked, paused, expired, over the
    limit, a key in the query, encoded or in the path, upstream 500 and reset, Redis down, the
    admin API and the CLI), no log line, metric or admin answer holds a key, its secret part,
    a key hash, the provider key, the admin token or a Bearer credential."""
    server: RedisServer = redis_factory()
    env = edge_env(server.url, upstream.url, EDGE_ADMIN_TOKEN=ADMIN_TOKEN, EDGE_LOG_LEVEL="debug")
    proc = spawn_edge(env, name="secrecy")
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    answers: list[str] = []
    keys_seen: list[str] = []

    def key(**fields: Any) -> tuple[str, str]:
        resp = httpx.post(f"{proc.url}/admin/keys", headers=admin, json={"plan": "free", **fields})
        assert resp.status_code == 201, resp.text
        keys_seen.append(resp.json()["key"])
        return resp.json()["key"], resp.json()["id"]

    valid, valid_id = key(owner="o")
    revoked, revoked_id = key()
    paused, paused_id = key()
    expired, _ = key(expires_at=1)
    limited, _ = key(rpm=1)
    unknown = keys.make_key("gw_sk_", keys.new_kid())
    keys_seen.append(unknown)
    with httpx.Client(base_url=proc.url, timeout=10) as client:
        for path in (f"keys/{revoked_id}/revoke", f"keys/{paused_id}/pause"):
            answers.append(client.post(f"/admin/{path}", headers=admin).text)
        rotated = client.post(f"/admin/keys/{valid_id}/rotate", headers=admin, json={})
        keys_seen.append(rotated.json()["key"])
        for presented in (valid, rotated.json()["key"], unknown, revoked, paused, expired):
            client.get("/v1/models", headers={"Authorization": f"Bearer {presented}"})
        for _ in range(2):
            client.get("/v1/models", headers={"Authorization": f"Bearer {limited}"})
        good = {"Authorization": f"Bearer {rotated.json()['key']}"}
        for url in (
            f"/v1/models?api_key={valid}",
            f"/v1/models?api_key={valid.replace('_', '%5F')}",
            f"/v1/files/{valid}",
        ):
            assert client.get(url, headers=good).status_code == 400
        client.get("/v1/models", headers={**good, "x-fake-status": "500"})
        with contextlib.suppress(httpx.HTTPError):
            client.get(
                "/v1/models",
                headers={**good, "x-fake-chunks": "5", "x-fake-reset-after": "2"},
            )
        for path in ("/admin/keys", "/admin/audit", f"/admin/keys/{valid_id}", "/admin/plans"):
            answers.append(client.get(path, headers=admin).text)
        answers.append(client.get("/admin/keys", headers={"Authorization": "Bearer wrong"}).text)
        metrics = client.get("/metrics").text
        cli = run_cli("keys", "list", "--json", redis_url=server.url)
        audit = run_cli("audit", "--json", redis_url=server.url)
        answers += [cli.stdout + cli.stderr, audit.stdout + audit.stderr]
        server.kill()
        for presented in (rotated.json()["key"], unknown):
            resp = client.get("/v1/models", headers={"Authorization": f"Bearer {presented}"})
            assert resp.status_code == 503

    forbidden: dict[str, str] = {"provider key": PROVIDER_KEY, "admin token": ADMIN_TOKEN}
    for i, plaintext in enumerate(keys_seen):
        forbidden[f"key {i}"] = plaintext
        forbidden[f"secret {i}"] = secret_part(plaintext)
        forbidden[f"hash {i}"] = hashlib.sha256(plaintext.encode()).hexdigest()
    log = proc.log()
    assert "DEBUG" in log or "WARNING" in log, "the edge log is empty: nothing was checked"
    assert_absent(log, {**forbidden, "Bearer credential": "Bearer "}, "the edge log")
    assert_absent(metrics, forbidden, "/metrics")
    for answer in answers:
        assert_absent(answer, forbidden, "an admin or CLI answer")
