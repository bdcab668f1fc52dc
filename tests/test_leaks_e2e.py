"""Leaked-key reports, `POST /admin/leaks`, through real edge processes on the session Redis.

A secret scanner posts the strings it found: each real key (valid checksum, and a hash that
matches a key's current or grace secret) is revoked at once and said to be `"revoked"`;
anything else is `"not_a_key"`, including a forged key with a valid checksum for a real key id.
With `keys.revoke_leaked = false` a real key is `"found"` and left alone. Each real key found
is audited (`leak`, with the source). Bodies are validated (422), the endpoint needs the admin
token (401) and allows 10 calls a minute per process (then 429).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from edge.control.records import KeyRecord
from edge.keys import make_key as forge_key
from tests.support.edge_process import EdgeProcess, admin_json, auth, edge_env
from tests.support.fake_upstream import FakeUpstream
from tests.support.redis_server import RedisServer

MakeKey = Callable[..., tuple[str, KeyRecord]]
SpawnEdge = Callable[..., EdgeProcess]

TOKEN = f"leaks-admin-{secrets.token_hex(12)}"
SOURCE = "https://github.com/example/repo/blob/0123abc/settings.py#L12"


@pytest.fixture(scope="module")
def leaky(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    fake_upstream_server: FakeUpstream,
) -> Iterator[EdgeProcess]:
    """An edge that revokes leaked keys (the default). Its tests make 10 leak calls at most:
    the endpoint's limit per minute."""
    env = edge_env(redis_server.url, fake_upstream_server.url, EDGE_ADMIN_TOKEN=TOKEN)
    proc = EdgeProcess(tmp_path_factory.mktemp("leaks"), env, "leaks").start()
    yield proc
    proc.stop()


def admin(proc: EdgeProcess, method: str, path: str, body: Any = None) -> dict[str, Any]:
    return admin_json(proc, TOKEN, method, path, body)


def report(proc: EdgeProcess, body: Any, token: str | None = TOKEN) -> httpx.Response:
    headers = auth(token) if token is not None else {}
    if isinstance(body, bytes):
        headers["Content-Type"] = "application/json"
        return httpx.post(f"{proc.url}/admin/leaks", headers=headers, content=body, timeout=10)
    return httpx.post(f"{proc.url}/admin/leaks", headers=headers, json=body, timeout=10)


def statuses(resp: httpx.Response) -> list[str]:
    assert resp.status_code == 200, resp.text
    return [item["status"] for item in resp.json()["data"]]


def models(proc: EdgeProcess, key: str) -> int:
    return httpx.get(f"{proc.url}/v1/models", headers=auth(key), timeout=10).status_code


def leak_entries(proc: EdgeProcess, kid: str) -> list[dict[str, Any]]:
    entries = admin(proc, "GET", f"/audit?key={kid}&limit=50")["data"]
    return [e for e in entries if e["action"] == "leak"]


def bad_checksum(key: str) -> str:
    return key[:-1] + ("A" if key[-1] != "A" else "B")


def test_a_report_revokes_real_keys_and_only_those(leaky: EdgeProcess, make_key: MakeKey) -> None:
    active, active_rec = make_key("pro")
    revoked, revoked_rec = make_key("pro")
    admin(leaky, "POST", f"/keys/{revoked_rec.id}/revoke")
    rotating, rotating_rec = make_key("pro")
    rotated = admin(leaky, "POST", f"/keys/{rotating_rec.id}/rotate", {"grace_seconds": 600})
    assert models(leaky, rotating) == 200  # the old secret, still in its grace
    bystander, bystander_rec = make_key("pro")
    forged = forge_key("gw_sk_", bystander_rec.id)  # right id, valid checksum, wrong secret
    assert forged != bystander and forged[:18] == bystander[:18]

    candidates = [
        active,
        revoked,
        forged,
        bad_checksum(bystander),
        "hello, world",
        rotating,  # the grace secret of a rotated key
        "gw_sk_" + "x" * 250,  # 256 characters, the most allowed
        "AKIAIOSFODNN7EXAMPLE",
    ]
    got = statuses(report(leaky, {"candidates": candidates, "source": SOURCE}))
    assert got == [
        "revoked",
        "revoked",
        "not_a_key",
        "not_a_key",
        "not_a_key",
        "revoked",
        "not_a_key",
        "not_a_key",
    ]

    # revoked for real: the very next request, and the record
    assert models(leaky, active) == 401
    assert admin(leaky, "GET", f"/keys/{active_rec.id}")["status"] == "revoked"
    # the leaked grace secret is dead too (the spec leaves the current secret, which was not
    # in the leak, to the implementation: this one ends the grace and keeps the key)
    assert models(leaky, rotating) == 401
    assert rotated["key"] != rotating
    # the forged key's id belongs to a key nobody leaked: untouched
    assert models(leaky, bystander) == 200
    assert admin(leaky, "GET", f"/keys/{bystander_rec.id}")["status"] == "active"

    [entry] = leak_entries(leaky, active_rec.id)
    assert entry["changes"]["source"] == SOURCE
    assert entry["changes"]["revoked"] is True
    assert entry["actor"].startswith("admin-api")
    assert [e["changes"]["source"] for e in leak_entries(leaky, rotating_rec.id)] == [SOURCE]
    assert all(e["changes"]["source"] == SOURCE for e in leak_entries(leaky, revoked_rec.id))
    assert leak_entries(leaky, bystander_rec.id) == []


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"{not json", id="not-json"),
        pytest.param({"source": SOURCE}, id="no-candidates"),
        pytest.param({"candidates": [], "source": SOURCE}, id="empty"),
        pytest.param({"candidates": ["x"] * 101, "source": SOURCE}, id="101-candidates"),
        pytest.param({"candidates": ["x" * 257], "source": SOURCE}, id="257-characters"),
        pytest.param({"candidates": [5], "source": SOURCE}, id="not-a-string"),
        pytest.param({"candidates": ["x"], "source": "h" * 2049}, id="source-too-long"),
    ],
)
def test_invalid_bodies_are_422(leaky: EdgeProcess, body: Any) -> None:
    resp = report(leaky, body)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_value")


def test_no_admin_token_no_report(leaky: EdgeProcess, make_key: MakeKey) -> None:
    key, _ = make_key("pro")
    body = {"candidates": [key], "source": SOURCE}
    for token in (None, "not-the-admin-token-at-all"):
        resp = report(leaky, body, token)
        assert resp.status_code == 401, resp.text
        assert resp.json()["error"]["code"] == "invalid_admin_token"
    assert models(leaky, key) == 200  # nothing was revoked


def test_with_revoke_leaked_false_a_real_key_is_found_and_kept(
    spawn_edge: SpawnEdge,
    redis_server: RedisServer,
    upstream: FakeUpstream,
    make_key: MakeKey,
) -> None:
    env = edge_env(
        redis_server.url, upstream.url, EDGE_ADMIN_TOKEN=TOKEN, EDGE_KEYS_REVOKE_LEAKED="false"
    )
    kept = spawn_edge(env, "kept")
    key, rec = make_key("pro")
    forged = forge_key("gw_sk_", rec.id)
    got = statuses(report(kept, {"candidates": [key, forged, "nope"], "source": SOURCE}))
    assert got == ["found", "not_a_key", "not_a_key"]
    assert models(kept, key) == 200
    assert admin(kept, "GET", f"/keys/{rec.id}")["status"] == "active"
    [entry] = leak_entries(kept, rec.id)
    assert entry["changes"]["source"] == SOURCE
    assert entry["changes"]["revoked"] is False


def test_the_11th_report_within_a_minute_is_429(
    spawn_edge: SpawnEdge,
    redis_server: RedisServer,
    upstream: FakeUpstream,
    make_key: MakeKey,
) -> None:
    limited = spawn_edge(edge_env(redis_server.url, upstream.url, EDGE_ADMIN_TOKEN=TOKEN), "lim")
    body = {"candidates": ["not a key"], "source": SOURCE}
    assert [statuses(report(limited, body)) for _ in range(10)] == [["not_a_key"]] * 10
    key, rec = make_key("pro")
    resp = report(limited, {"candidates": [key], "source": SOURCE})
    assert resp.status_code == 429, resp.text
    assert isinstance(resp.json()["error"]["message"], str)
    assert models(limited, key) == 200  # the refused report revoked nothing
    assert admin(limited, "GET", f"/keys/{rec.id}")["status"] == "active"
