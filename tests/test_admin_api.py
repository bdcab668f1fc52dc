"""The admin API (`/admin/*`, edge/control/admin_api.py) through real edge processes sharing one
Redis.

Auth by admin token (404 when none is configured, 401 `invalid_admin_token` otherwise), key
create/show/list/patch/pause/resume/revoke/rotate/credits, the 422 matrix, the per-owner cap
(concurrent creates across two processes included), plans and the audit log. A change made
through one process takes effect on the other at the very next `/v1` request. Every answer,
success or error, is JSON; no answer but create/rotate holds a key, and none holds a hash, the
admin token lands in no log and no metric. Each test uses fresh owners; Redis is never flushed.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import httpx
import pytest

from edge.control.specs import NewKey
from edge.control.store import KeyStore
from edge.keys import key_hash
from tests.support.edge_process import EdgeProcess, auth, edge_env, run_cli
from tests.support.fake_upstream import FakeUpstream
from tests.support.keys import secret_part, store_call
from tests.support.redis_server import RedisServer

TOKEN = f"admin-{secrets.token_hex(16)}"
HEX64 = re.compile(r"[0-9a-fA-F]{64}")
RECORD_FIELDS = {
    "id",
    "plan",
    "status",
    "name",
    "owner",
    "rpm",
    "rpd",
    "rpm_override",
    "rpd_override",
    "tpm",
    "tpd",
    "tpm_override",
    "tpd_override",
    "created",
    "expires",
    "last_used",
    "requests",
    "tokens",
    "credits",
    "scopes",
    "rotated",
    "previous_key_valid_until",
    "previous_key_requests",
    "previous_key_last_used",
    "shadow",
    "shadow_override",
    "day_used",
}
UNKNOWN_KID = "A" * 12  # well-formed, never issued
ANY = object()


class Pair(NamedTuple):
    a: EdgeProcess
    b: EdgeProcess


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    fake_upstream_server: FakeUpstream,
) -> Iterator[Pair]:
    """Two edge processes with the admin API on, same Redis, default cap (20 per owner)."""
    log_dir = tmp_path_factory.mktemp("admin")
    env = edge_env(redis_server.url, fake_upstream_server.url, EDGE_ADMIN_TOKEN=TOKEN)
    procs: list[EdgeProcess] = []
    try:
        for name in ("admin-a", "admin-b"):
            procs.append(EdgeProcess(log_dir, env, name).start())
        yield Pair(*procs)
    finally:
        for proc in procs:
            proc.stop()


def admin(proc: EdgeProcess, token: str = TOKEN) -> httpx.Client:
    return httpx.Client(base_url=f"{proc.url}/admin", headers=auth(token), timeout=10)


def owner() -> str:
    return f"adm-{uuid.uuid4().hex[:12]}"


def answer(resp: httpx.Response, status: int) -> Any:
    """The JSON body of an answer that must have `status` and be JSON."""
    assert resp.status_code == status, (resp.request.method, resp.request.url, resp.text)
    assert resp.headers["content-type"] == "application/json", resp.headers
    return resp.json()


def error(
    resp: httpx.Response,
    status: int,
    code: str,
    type_: str = "invalid_request_error",
    param: object = ANY,
) -> dict[str, Any]:
    """OpenAI's error shape with this status, type and code (and param, when given)."""
    body = answer(resp, status)
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert (err["type"], err["code"]) == (type_, code), err
    if param is not ANY:
        assert err["param"] == param, err
    return err  # type: ignore[no-any-return]


def create(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    return answer(client.post("/keys", json=fields), 201)  # type: ignore[no-any-return]


def v1(proc: EdgeProcess, key: str) -> httpx.Response:
    return httpx.get(f"{proc.url}/v1/models", headers=auth(key), timeout=10)


def listed(client: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    page = answer(client.get("/keys", params={"limit": 1000, **params}), 200)
    assert page["next_cursor"] is None
    return page["data"]  # type: ignore[no-any-return]


def assert_secret_free(text: str, keys: list[str], where: str) -> None:
    """No plaintext key, secret part, key hash or admin token in `text`."""
    assert TOKEN not in text, f"{where} holds the admin token"
    for key in keys:
        assert key not in text, f"{where} holds a key"
        assert secret_part(key) not in text, f"{where} holds a key's secret"
        assert key_hash(key) not in text, f"{where} holds a key's hash"


# 1. auth


def test_admin_api_is_off_without_a_token_and_guarded_with_one(
    pair: Pair,
    spawn_edge: Callable[..., EdgeProcess],
    redis_server: RedisServer,
    upstream: FakeUpstream,
) -> None:
    """No admin token: /admin/* is the control plane's JSON 404, token or not. With one, every
    wrong Authorization gets 401 `invalid_admin_token` without echoing what was sent (and does
    nothing); the right token gets 200; the token never reaches a log or /metrics."""
    off = spawn_edge(edge_env(redis_server.url, upstream.url), name="no-admin")
    for headers in ({}, auth(TOKEN)):
        error(httpx.get(f"{off.url}/admin/keys", headers=headers), 404, "not_found")
        error(httpx.post(f"{off.url}/admin/keys", headers=headers, json={}), 404, "not_found")
        error(httpx.get(f"{off.url}/admin/plans", headers=headers), 404, "not_found")

    me = owner()
    wrong = {
        "missing": {},
        "wrong token": auth("x" * len(TOKEN)),
        "basic": {"Authorization": f"Basic {TOKEN}"},
        "trailing char": auth(TOKEN + "x"),
        "one char short": auth(TOKEN[:-1]),
        "no scheme": {"Authorization": TOKEN},
        "bearer without token": {"Authorization": "Bearer"},
    }
    for label, headers in wrong.items():
        for method, path, body in (
            ("GET", "/admin/keys", None),
            ("GET", "/admin/plans", None),
            ("GET", "/admin/audit", None),
            ("POST", "/admin/keys", {"plan": "free", "owner": me}),
            ("POST", f"/admin/keys/{UNKNOWN_KID}/revoke", None),
        ):
            resp = httpx.request(method, pair.a.url + path, headers=headers, json=body)
            err = error(resp, 401, "invalid_admin_token")
            assert err["param"] is None, label
            assert TOKEN not in resp.text, label
            presented = headers.get("Authorization", "").partition(" ")[2]
            if presented:
                assert presented not in resp.text, (label, resp.text)

    with admin(pair.a) as client:
        assert listed(client, owner=me) == []  # the unauthorized create made nothing
    page = answer(httpx.get(f"{pair.b.url}/admin/keys", headers=auth(TOKEN)), 200)
    assert set(page) == {"object", "data", "next_cursor"}
    lower = {"Authorization": f"bearer {TOKEN}"}  # the scheme is case-insensitive (RFC 9110)
    answer(httpx.get(f"{pair.a.url}/admin/plans", headers=lower), 200)

    for proc in (*pair, off):
        assert TOKEN not in proc.log(), f"{proc.log_path} holds the admin token"
        assert TOKEN not in httpx.get(f"{proc.url}/metrics").text


# 2. create


def test_create_shows_the_key_once_and_it_works_on_both_processes(pair: Pair) -> None:
    """201 with the record and the key; the key passes /v1 through either process; show and
    list never hold the key, its secret or any 64-hex hash; the record counts the use."""
    me = owner()
    with admin(pair.a) as client:
        created = create(
            client,
            plan="pro",
            name="ci bot",
            owner=me,
            rpm=7,
            rpd=70,
            scopes={"routes": ["/v1/models"]},
            credits=5,
        )
        assert set(created) == RECORD_FIELDS | {"key"}
        kid, key = created["id"], created["key"]
        assert re.fullmatch(r"[0-9A-Za-z]{12}", kid)
        assert key.startswith("gw_sk_" + kid)
        expected = {
            "plan": "pro",
            "status": "active",
            "name": "ci bot",
            "owner": me,
            "rpm": 7,
            "rpd": 70,
            "rpm_override": 7,
            "rpd_override": 70,
            "expires": None,
            "last_used": None,
            "requests": 0,
            "credits": 5,
            "scopes": {"routes": ["models"], "models": []},
            "rotated": None,
            "previous_key_valid_until": None,
        }
        assert {k: created[k] for k in expected} == expected
        assert isinstance(created["created"], int)
        assert abs(created["created"] - time.time()) < 60

        assert v1(pair.a, key).status_code == 200
        resp = v1(pair.b, key)
        assert resp.status_code == 200
        assert resp.headers["x-ratelimit-limit-requests"] == "7"

        shown_resp = client.get(f"/keys/{kid}")
        shown = answer(shown_resp, 200)
        assert set(shown) == RECORD_FIELDS
        assert shown["requests"] == 2
        assert shown["credits"] == 3
        assert shown["last_used"] is not None
        assert {k: shown[k] for k in ("id", "plan", "owner", "name", "rpm", "scopes")} == {
            k: created[k] for k in ("id", "plan", "owner", "name", "rpm", "scopes")
        }
        list_resp = client.get("/keys", params={"owner": me})
        [row] = answer(list_resp, 200)["data"]
        assert row == shown
        for resp in (shown_resp, list_resp):
            assert HEX64.search(resp.text) is None, resp.text
            assert_secret_free(resp.text, [key], "a show/list answer")


def test_create_with_an_expiry(pair: Pair) -> None:
    """expires_in is counted from creation; expires_at is kept as given; a past expires_at
    makes a key that /v1 refuses with 401 saying it expired."""
    now = int(time.time())
    with admin(pair.a) as client:
        within = create(client, plan="free", owner=owner(), expires_in=3600)
        assert within["expires"] == within["created"] + 3600
        assert v1(pair.b, within["key"]).status_code == 200

        later = create(client, plan="free", expires_at=now + 86_400)
        assert later["expires"] == now + 86_400
        assert v1(pair.b, later["key"]).status_code == 200

        past = create(client, plan="free", expires_at=now - 60)
        assert past["expires"] == now - 60
        assert past["status"] == "active"
    err = error(v1(pair.b, past["key"]), 401, "invalid_api_key")
    assert "expired" in err["message"]


# 3. invalid bodies


def test_invalid_create_bodies_are_422_naming_the_field(pair: Pair) -> None:
    """Each invalid body: 422 `invalid_value` with `param` naming the field, and no key made.
    A body over 64 KiB is 413 (exactly 64 KiB is still read and validated)."""
    me = owner()

    def body(**fields: Any) -> bytes:
        return json.dumps({"plan": "free", "owner": me, **fields}).encode()

    cases: list[tuple[str, bytes, str | None]] = [
        ("unknown plan", body(plan="gold"), "plan"),
        ("plan not text", body(plan=5), "plan"),
        ("rpm -1", body(rpm=-1), "rpm"),
        ('rpm "5"', body(rpm="5"), "rpm"),
        ("rpm 5.5", body(rpm=5.5), "rpm"),
        ("rpm 5.0", body(rpm=5.0), "rpm"),
        ("rpm true", body(rpm=True), "rpm"),
        ("rpd huge", body(rpd=10**13), "rpd"),
        ("unknown field", body(colour="red"), "colour"),
        ("expires_in 0", body(expires_in=0), "expires_in"),
        ("scopes.routes not a list", body(scopes={"routes": "models"}), "scopes.routes"),
        ("scopes.models with a space", body(scopes={"models": ["gpt 4"]}), "scopes.models.0"),
        ("unknown scope", body(scopes={"tools": []}), "scopes.tools"),
        ("name with a control char", body(name="bad\x07name"), "name"),
        ("owner too long", body(owner="o" * 201), "owner"),
        ("credits -1", body(credits=-1), "credits"),
        ("empty body", b"", "plan"),
        ("empty object", b"{}", "plan"),
    ]
    with admin(pair.a) as client:
        for label, raw, param in cases:
            resp = client.post("/keys", content=raw, headers={"content-type": "application/json"})
            err = error(resp, 422, "invalid_value", param=param)
            assert err["message"], label

        for label, raw in (("bad JSON", b'{"plan": '), ("not an object", b"[]")):
            resp = client.post("/keys", content=raw)
            err = error(resp, 422, "invalid_value")
            assert err["param"] is None, label

        prefix = b'{"plan": "free", "owner": "' + me.encode() + b'", "name": "'
        at_limit = prefix + b"x" * (64 * 1024 - len(prefix) - 2) + b'"}'
        assert len(at_limit) == 64 * 1024
        error(client.post("/keys", content=at_limit), 422, "invalid_value", param="name")
        error(client.post("/keys", content=at_limit + b" "), 413, "request_too_large")
        error(client.post("/keys", content=b"{" + b" " * 200_000 + b"}"), 413, "request_too_large")

        assert listed(client, owner=me) == []


def test_both_expiries_is_422_naming_a_field(pair: Pair) -> None:
    """expires_in and expires_at together: 422 `invalid_value` whose `param` names one of
    the two fields (not null: the body is valid JSON and the error is about those fields)."""
    me = owner()
    both = {"plan": "free", "owner": me, "expires_in": 60, "expires_at": int(time.time()) + 60}
    with admin(pair.a) as client:
        err = error(client.post("/keys", json=both), 422, "invalid_value")
        assert "expires_in" in err["message"] and "expires_at" in err["message"]
        assert listed(client, owner=me) == []
        assert err["param"] in ("expires_in", "expires_at"), err


# 4. listing


def test_listing_by_owner_pages_with_a_cursor(
    pair: Pair,
    spawn_edge: Callable[..., EdgeProcess],
    redis_server: RedisServer,
    upstream: FakeUpstream,
) -> None:
    """?owner= lists only that owner's keys, newest first; limit=10 over 25 keys gives 10, 10, 5
    and a null cursor, no repeats; ?status= filters (and pages); bad queries are 422."""
    roomy = spawn_edge(
        edge_env(
            redis_server.url, upstream.url, EDGE_ADMIN_TOKEN=TOKEN, EDGE_KEYS_MAX_PER_OWNER="5000"
        ),
        name="roomy",
    )
    me, other = owner(), owner()
    with admin(roomy) as client:
        creation_order = [create(client, plan="free", owner=me)["id"] for _ in range(25)]
        ids = set(creation_order)
        assert len(ids) == 25
        stranger = create(client, plan="free", owner=other)["id"]

    with admin(pair.a) as client:
        rows: list[dict[str, Any]] = []
        sizes = []
        cursor = None
        while True:
            params: dict[str, Any] = {"owner": me, "limit": 10}
            if cursor is not None:
                params["cursor"] = cursor
            page = answer(client.get("/keys", params=params), 200)
            assert set(page) == {"object", "data", "next_cursor"} and page["object"] == "list"
            rows += page["data"]
            sizes.append(len(page["data"]))
            cursor = page["next_cursor"]
            if cursor is None:
                break
            assert len(sizes) < 10, "the cursor never ends"
        assert sizes == [10, 10, 5]
        listed_ids = [row["id"] for row in rows]
        assert len(listed_ids) == len(set(listed_ids)) == 25
        assert set(listed_ids) == ids
        assert stranger not in listed_ids
        assert all(row["owner"] == me for row in rows)
        assert listed_ids == creation_order[::-1]  # newest first, to the microsecond
        assert [row["id"] for row in listed(client, owner=me)] == listed_ids
        assert all("key" not in row for row in rows)

        paused = sorted(ids)[:3]
        for kid in paused:
            assert answer(client.post(f"/keys/{kid}/pause"), 200)["status"] == "paused"
        only = listed(client, owner=me, status="paused")
        assert sorted(row["id"] for row in only) == paused
        active = listed(client, owner=me, status="active")
        assert {row["id"] for row in active} == ids - set(paused)
        first = answer(
            client.get("/keys", params={"owner": me, "status": "paused", "limit": 2}), 200
        )
        assert len(first["data"]) == 2 and first["next_cursor"]
        params = {"owner": me, "status": "paused", "limit": 2, "cursor": first["next_cursor"]}
        second = answer(client.get("/keys", params=params), 200)
        assert len(second["data"]) == 1 and second["next_cursor"] is None
        assert sorted(row["id"] for row in first["data"] + second["data"]) == paused

        not_a_member = "ZZZZ"  # valid base64, not a cursor edge handed out
        for params, param in (
            ({"cursor": "not a cursor!"}, "cursor"),
            ({"cursor": not_a_member}, "cursor"),
            ({"limit": 0}, "limit"),
            ({"limit": "abc"}, "limit"),
            ({"limit": -5}, "limit"),
            ({"limit": 1001}, "limit"),
            ({"status": "bogus"}, "status"),
            ({"colour": "red"}, "colour"),
        ):
            resp = client.get("/keys", params={"owner": me, **params})
            error(resp, 422, "invalid_value", param=param)


@pytest.mark.slow
def test_paging_over_a_thousand_keys(pair: Pair, redis_server: RedisServer) -> None:
    """1,000 keys of one owner, limit=100: exactly those 1,000 ids, newest first, none twice,
    although keys are created for that owner while the client pages."""
    me = owner()

    async def make(store: KeyStore, count: int) -> list[str]:
        store.owners.cap = 5000  # this owner is far past the default cap
        return [
            (await store.create(NewKey(plan="free", owner=me), "test"))[1].id for _ in range(count)
        ]

    ids: list[str] = store_call(redis_server.url, lambda store: make(store, 1000))
    assert len(set(ids)) == 1000

    seen: list[str] = []
    order: list[tuple[int, str]] = []
    late: list[str] = []
    sizes = []
    cursor = None
    with admin(pair.a) as client:
        while True:
            params: dict[str, Any] = {"owner": me, "limit": 100}
            if cursor is not None:
                params["cursor"] = cursor
            page = answer(client.get("/keys", params=params), 200)
            seen += [row["id"] for row in page["data"]]
            order += [row["created"] for row in page["data"]]
            sizes.append(len(page["data"]))
            cursor = page["next_cursor"]
            if cursor is None:
                break
            assert len(sizes) < 20, "the cursor never ends"
            if len(sizes) % 3 == 1:  # keys created mid-way: newer than everything listed
                late += store_call(redis_server.url, lambda store: make(store, 2))
    assert len(seen) == len(set(seen)), "an id was listed twice"
    assert set(ids) <= set(seen)
    assert set(seen) == set(ids)  # keys created mid-way are newer than the cursor: not listed
    assert all(size == 100 for size in sizes[:-1])
    assert order == sorted(order, reverse=True)


# 5. PATCH


def test_patch_changes_a_key_and_null_clears(pair: Pair) -> None:
    """PATCH sets name, owner, plan, rpm, rpd, scopes, expires_at, credits; the other process
    applies the new rpm at the next request; null clears an override (back to the plan's
    limit), the scopes, the expiry and the balance. Bad changes are 422 and change nothing;
    a revoked key is 409; an unknown id is 404."""
    before, after = owner(), owner()
    expires = int(time.time()) + 86_400
    with admin(pair.a) as client:
        created = create(client, plan="free", owner=before, name="before", rpm=7)
        kid, key = created["id"], created["key"]
        change = {
            "name": "after",
            "owner": after,
            "plan": "pro",
            "rpm": 50,
            "rpd": 500,
            "scopes": {"routes": ["models", "embeddings"]},
            "expires_at": expires,
            "credits": 10,
        }
        patched = answer(client.patch(f"/keys/{kid}", json=change), 200)
        assert set(patched) == RECORD_FIELDS
        expected = {
            "id": kid,
            "name": "after",
            "owner": after,
            "plan": "pro",
            "status": "active",
            "rpm": 50,
            "rpd": 500,
            "rpm_override": 50,
            "rpd_override": 500,
            "scopes": {"routes": ["models", "embeddings"], "models": []},
            "expires": expires,
            "credits": 10,
        }
        assert {k: patched[k] for k in expected} == expected
        assert answer(client.get(f"/keys/{kid}"), 200) == patched
        assert listed(client, owner=before) == []
        assert [row["id"] for row in listed(client, owner=after)] == [kid]

        resp = v1(pair.b, key)
        assert resp.status_code == 200
        assert resp.headers["x-ratelimit-limit-requests"] == "50"

        cleared = answer(client.patch(f"/keys/{kid}", json={"rpm": None}), 200)
        assert (cleared["rpm"], cleared["rpm_override"]) == (200, None)  # pro's limit
        assert (cleared["rpd"], cleared["rpd_override"]) == (500, 500)  # untouched
        resp = v1(pair.b, key)
        assert resp.status_code == 200
        assert resp.headers["x-ratelimit-limit-requests"] == "200"

        nulls = {"scopes": None, "expires_at": None, "credits": None, "name": None}
        cleared = answer(client.patch(f"/keys/{kid}", json=nulls), 200)
        assert {k: cleared[k] for k in ("scopes", "expires", "credits", "name")} == {
            "scopes": None,
            "expires": None,
            "credits": None,
            "name": "",
        }

        for bad, param in (
            ({"plan": "gold"}, "plan"),
            ({"plan": None}, "plan"),
            ({"rpm": "5"}, "rpm"),
            ({"rpd": -1}, "rpd"),
            ({"scopes": {"routes": "models"}}, "scopes.routes"),
            ({"expires_in": 60}, "expires_in"),
            ({"status": "active"}, "status"),
        ):
            error(client.patch(f"/keys/{kid}", json=bad), 422, "invalid_value", param=param)
        error(client.patch(f"/keys/{kid}", json={}), 422, "invalid_value")
        error(client.patch(f"/keys/{kid}", content=b"{"), 422, "invalid_value", param=None)
        assert answer(client.get(f"/keys/{kid}"), 200) == cleared  # nothing changed

        answer(client.post(f"/keys/{kid}/revoke"), 200)
        error(client.patch(f"/keys/{kid}", json={"name": "zombie"}), 409, "conflict")
        error(client.patch(f"/keys/{kid}", json={"rpm": 5}), 409, "conflict")
        revoked = answer(client.get(f"/keys/{kid}"), 200)
        assert (revoked["name"], revoked["rpm"], revoked["status"]) == ("", 200, "revoked")

        for missing in (UNKNOWN_KID, "nope"):
            error(client.patch(f"/keys/{missing}", json={"name": "x"}), 404, "not_found")


# 6. pause / resume / revoke


def test_status_changes_apply_on_the_other_process_at_once(pair: Pair) -> None:
    """pause → 403, resume → 200, revoke → 401 through the other process at its very next
    request; revocation is final (resume, pause, rotate, credits → 409); unknown ids are 404."""
    with admin(pair.a) as client:
        created = create(client, plan="pro", owner=owner(), credits=100)
        kid, key = created["id"], created["key"]
        assert v1(pair.b, key).status_code == 200

        assert answer(client.post(f"/keys/{kid}/pause"), 200)["status"] == "paused"
        err = error(v1(pair.b, key), 403, "insufficient_permissions", "permission_error")
        assert "paused" in err["message"]
        assert answer(client.get(f"/keys/{kid}"), 200)["status"] == "paused"

        assert answer(client.post(f"/keys/{kid}/resume"), 200)["status"] == "active"
        assert v1(pair.b, key).status_code == 200

        revoked = answer(client.post(f"/keys/{kid}/revoke"), 200)
        assert revoked["status"] == "revoked"
        err = error(v1(pair.b, key), 401, "invalid_api_key")
        assert "revoked" in err["message"]

        error(client.post(f"/keys/{kid}/resume"), 409, "conflict")
        error(client.post(f"/keys/{kid}/pause"), 409, "conflict")
        error(client.post(f"/keys/{kid}/rotate", json={"grace_seconds": 60}), 409, "conflict")
        error(client.post(f"/keys/{kid}/credits", json={"delta": 5}), 409, "conflict")
        after = answer(client.get(f"/keys/{kid}"), 200)
        assert (after["status"], after["credits"], after["rotated"]) == ("revoked", 98, None)
        error(v1(pair.a, key), 401, "invalid_api_key")

        for missing in (UNKNOWN_KID, "nope", "a" * 40):
            error(client.get(f"/keys/{missing}"), 404, "not_found")
            for action in ("pause", "resume", "revoke"):
                error(client.post(f"/keys/{missing}/{action}"), 404, "not_found")
            error(client.post(f"/keys/{missing}/rotate", json={}), 404, "not_found")
            error(client.post(f"/keys/{missing}/credits", json={"delta": 1}), 404, "not_found")
        error(client.get("/nothing-here"), 404, "not_found")
        error(client.delete(f"/keys/{kid}"), 405, "method_not_allowed")


# 7. rotate


def test_rotate_with_and_without_grace(pair: Pair) -> None:
    """A rotation with grace keeps the old key valid alongside the new one; grace 0 kills the
    old key at once; a negative grace is 422 and rotates nothing."""
    with admin(pair.a) as client:
        created = create(client, plan="pro", owner=owner())
        kid, first = created["id"], created["key"]

        rotated = answer(client.post(f"/keys/{kid}/rotate", json={"grace_seconds": 3600}), 200)
        assert set(rotated) == RECORD_FIELDS | {"key"}
        second = rotated["key"]
        assert second != first and second.startswith("gw_sk_" + kid)
        assert rotated["rotated"] is not None
        assert rotated["previous_key_valid_until"] == rotated["rotated"] + 3600
        for proc in pair:
            assert v1(proc, first).status_code == 200
            assert v1(proc, second).status_code == 200
        shown = client.get(f"/keys/{kid}")
        assert set(answer(shown, 200)) == RECORD_FIELDS
        assert HEX64.search(shown.text) is None
        assert_secret_free(shown.text, [first, second], "a show answer")

        for bad in ({"grace_seconds": -1}, {"grace_seconds": "5"}, {"grace": 5}):
            param = "grace" if "grace" in bad else "grace_seconds"
            resp = client.post(f"/keys/{kid}/rotate", json=bad)
            error(resp, 422, "invalid_value", param=param)
        assert v1(pair.b, second).status_code == 200  # not rotated by the refused requests

        again = answer(client.post(f"/keys/{kid}/rotate", json={"grace_seconds": 0}), 200)
        third = again["key"]
        assert again["previous_key_valid_until"] is None
        error(v1(pair.b, second), 401, "invalid_api_key")
        error(v1(pair.b, first), 401, "invalid_api_key")
        assert v1(pair.b, third).status_code == 200

        fourth = answer(client.post(f"/keys/{kid}/rotate"), 200)["key"]  # no body: grace 0
        error(v1(pair.b, third), 401, "invalid_api_key")
        assert v1(pair.b, fourth).status_code == 200


# 8. credits


def test_credits_top_up_and_take_away(pair: Pair) -> None:
    """Credits 2 admit two requests then 402; a top-up of 3 admits exactly 3 more; a large
    negative delta stops at 0; a key without a balance cannot be topped up (409)."""
    with admin(pair.a) as client:
        created = create(client, plan="pro", owner=owner(), credits=2)
        kid, key = created["id"], created["key"]
        assert [v1(pair.a, key).status_code, v1(pair.b, key).status_code] == [200, 200]
        error(v1(pair.a, key), 402, "insufficient_balance", "insufficient_balance")
        assert answer(client.get(f"/keys/{kid}"), 200)["credits"] == 0

        topped = answer(client.post(f"/keys/{kid}/credits", json={"delta": 3}), 200)
        assert topped["credits"] == 3
        statuses = [v1(proc, key).status_code for proc in (*pair, *pair, *pair)]
        assert statuses == [200, 200, 200, 402, 402, 402]
        assert answer(client.get(f"/keys/{kid}"), 200)["credits"] == 0

        assert answer(client.post(f"/keys/{kid}/credits", json={"delta": 5}), 200)["credits"] == 5
        drained = answer(client.post(f"/keys/{kid}/credits", json={"delta": -100}), 200)
        assert drained["credits"] == 0
        error(v1(pair.b, key), 402, "insufficient_balance", "insufficient_balance")

        for bad in ({"delta": "5"}, {"delta": 5.0}, {"delta": True}, {}, {"delta": 10**12}):
            resp = client.post(f"/keys/{kid}/credits", json=bad)
            error(resp, 422, "invalid_value", param="delta")
        assert answer(client.get(f"/keys/{kid}"), 200)["credits"] == 0

        unlimited = create(client, plan="pro", owner=owner())
        error(client.post(f"/keys/{unlimited['id']}/credits", json={"delta": 5}), 409, "conflict")
        assert answer(client.get(f"/keys/{unlimited['id']}"), 200)["credits"] is None
        assert v1(pair.b, unlimited["key"]).status_code == 200


# 9. per-owner cap


def test_owner_cap_refuses_the_next_create_until_one_is_revoked(
    spawn_edge: Callable[..., EdgeProcess], redis_server: RedisServer, upstream: FakeUpstream
) -> None:
    """With keys.max_per_owner = 3: three creates, then 409 `conflict`; revoking one frees a
    place (and only one); other owners are not affected."""
    capped = spawn_edge(
        edge_env(
            redis_server.url, upstream.url, EDGE_ADMIN_TOKEN=TOKEN, EDGE_KEYS_MAX_PER_OWNER="3"
        ),
        name="capped",
    )
    me = owner()
    with admin(capped) as client:
        kids = [create(client, plan="free", owner=me)["id"] for _ in range(3)]
        error(client.post("/keys", json={"plan": "free", "owner": me}), 409, "conflict")
        assert len(listed(client, owner=me)) == 3
        create(client, plan="free", owner=owner())  # someone else
        create(client, plan="free")  # no owner: no cap

        answer(client.post(f"/keys/{kids[0]}/revoke"), 200)
        create(client, plan="free", owner=me)
        error(client.post("/keys", json={"plan": "free", "owner": me}), 409, "conflict")
        rows = listed(client, owner=me)
        assert Counter(row["status"] for row in rows) == {"active": 3, "revoked": 1}


async def test_concurrent_creates_at_the_cap_make_exactly_one_key(pair: Pair) -> None:
    """An owner one below the default cap (20): twenty concurrent creates across both
    processes give exactly one 201 and nineteen 409s; the owner then holds exactly 20 keys."""
    me = owner()
    body = {"plan": "free", "owner": me}
    async with httpx.AsyncClient(headers=auth(TOKEN), timeout=20) as client:
        for _ in range(19):
            answer(await client.post(f"{pair.a.url}/admin/keys", json=body), 201)
        urls = [pair.a.url, pair.b.url] * 10
        results = await asyncio.gather(*(client.post(f"{u}/admin/keys", json=body) for u in urls))
        assert Counter(resp.status_code for resp in results) == {201: 1, 409: 19}
        for resp in results:
            if resp.status_code == 409:
                error(resp, 409, "conflict")
            else:
                assert answer(resp, 201)["owner"] == me
        page = answer(
            await client.get(f"{pair.b.url}/admin/keys", params={"owner": me, "limit": 100}), 200
        )
    assert page["next_cursor"] is None
    assert len(page["data"]) == 20
    assert all(row["status"] == "active" for row in page["data"])
    assert len({row["id"] for row in page["data"]}) == 20


# 10. plans


def test_plans_lists_the_default_plan_table(pair: Pair) -> None:
    """GET /admin/plans: the three default plans with their limits."""
    with admin(pair.b) as client:
        plans = answer(client.get("/plans"), 200)
    assert plans["object"] == "list"
    assert sorted(plans["data"], key=lambda row: row["rpm"]) == [
        {"plan": "free", "rpm": 20, "rpd": 1000, "tpm": None, "tpd": None, "shadow": False},
        {"plan": "pro", "rpm": 200, "rpd": 50_000, "tpm": None, "tpd": None, "shadow": False},
        {"plan": "team", "rpm": 1000, "rpd": 250_000, "tpm": None, "tpd": None, "shadow": False},
    ]


# 11. audit


def stream_id(entry: dict[str, Any]) -> tuple[int, int]:
    ms, seq = entry["id"].split("-")
    return int(ms), int(seq)


def test_audit_lists_every_change_newest_first_without_secrets(
    pair: Pair, redis_server: RedisServer
) -> None:
    """create, pause, rotate, credits, revoke through the API are audited newest first with
    the key id, owner, actor and changes, pageable by cursor; a CLI change has actor "cli".
    Neither the audit answer nor the `edge.audit` log lines hold a key, a hash or the token."""
    me = owner()
    with admin(pair.a) as client:
        created = create(client, plan="pro", owner=me, credits=5)
        kid = created["id"]
        answer(client.post(f"/keys/{kid}/pause"), 200)
    with admin(pair.b) as client:
        rotated = answer(client.post(f"/keys/{kid}/rotate", json={"grace_seconds": 60}), 200)
        answer(client.post(f"/keys/{kid}/credits", json={"delta": 2}), 200)
        answer(client.post(f"/keys/{kid}/revoke"), 200)
        resp = client.get("/audit", params={"limit": 5})
        page = answer(resp, 200)
        everything = client.get("/audit", params={"limit": 1000})
    keys = [created["key"], rotated["key"]]

    assert set(page) == {"object", "data", "next_cursor"} and page["object"] == "list"
    mine = page["data"]
    assert [e["key"] for e in mine] == [kid] * 5  # nothing else happened in between
    assert page["next_cursor"] == mine[-1]["id"]
    assert [e["action"] for e in mine] == ["revoke", "credits", "rotate", "pause", "create"]
    ids = [stream_id(e) for e in answer(everything, 200)["data"]]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
    assert [e["changes"] for e in mine] == [
        {"status": "revoked"},
        {"delta": 2, "credits": 7},
        {"grace_seconds": 60},
        {"status": "paused"},
        {"plan": "pro", "owner": me, "credits": 5},
    ]
    for entry in mine:
        assert set(entry) == {"id", "time", "action", "key", "owner", "actor", "changes"}
        assert entry["owner"] == me
        assert entry["actor"].startswith("admin-api 127.0.0.1"), entry
        assert abs(entry["time"] - time.time()) < 60
    for text in (resp.text, everything.text):
        assert HEX64.search(text) is None
        assert_secret_free(text, keys, "the audit answer")

    with admin(pair.a) as client:
        walked: list[dict[str, Any]] = []
        cursor = None
        for _ in range(3):
            params: dict[str, Any] = {"limit": 2}
            if cursor is not None:
                params["cursor"] = cursor
            step = answer(client.get("/audit", params=params), 200)
            walked += step["data"]
            cursor = step["next_cursor"]
            if len(walked) < 5:
                assert len(step["data"]) == 2 and cursor == step["data"][-1]["id"]
        assert walked[:5] == mine
        for params, param in (
            ({"cursor": "nope"}, "cursor"),
            ({"limit": 0}, "limit"),
            ({"limit": "x"}, "limit"),
            ({"limit": 1001}, "limit"),
        ):
            error(client.get("/audit", params=params), 422, "invalid_value", param=param)

        other = create(client, plan="free", owner=me)
        keys.append(other["key"])
        done = run_cli("keys", "pause", other["id"], redis_url=redis_server.url)
        assert done.returncode == 0, done.stderr
        [latest] = answer(client.get("/audit", params={"limit": 1}), 200)["data"]
    assert {k: latest[k] for k in ("action", "key", "owner", "actor", "changes")} == {
        "action": "pause",
        "key": other["id"],
        "owner": me,
        "actor": "cli",
        "changes": {"status": "paused"},
    }

    for proc in pair:
        log = proc.log()
        assert_secret_free(log, keys, f"{proc.log_path}")
        lines = [line for line in log.splitlines() if " edge.control.audit: " in line]
        assert lines, f"{proc.log_path} has no edge.control.audit line"
        for line in lines:
            assert HEX64.search(line) is None, line
    logged = {
        proc.log_path.name: [
            (e["action"], e["actor"], e["changes"]) for e in (audit_lines(proc)) if e["key"] == kid
        ]
        for proc in pair
    }
    actor = mine[0]["actor"]
    assert logged == {
        pair.a.log_path.name: [
            ("create", actor, {"plan": "pro", "owner": me, "credits": 5}),
            ("pause", actor, {"status": "paused"}),
        ],
        pair.b.log_path.name: [
            ("rotate", actor, {"grace_seconds": 60}),
            ("credits", actor, {"delta": 2, "credits": 7}),
            ("revoke", actor, {"status": "revoked"}),
        ],
    }


def audit_lines(proc: EdgeProcess) -> list[dict[str, Any]]:
    """The JSON of each `edge.audit` log line of `proc`."""
    marker = " edge.control.audit: "
    return [
        json.loads(line.split(marker, 1)[1]) for line in proc.log().splitlines() if marker in line
    ]


def test_day_used_counts_what_the_day_bucket_holds_back(pair: Pair) -> None:
    """`day_used` (the dashboard's "today" bar) is the day bucket's capacity minus its level:
    three requests on a fresh key make it 3, on either process."""
    with admin(pair.a) as client:
        created = create(client, plan="free", owner=owner())
        assert created["day_used"] == 0
        for proc in (pair.a, pair.b, pair.a):
            assert v1(proc, created["key"]).status_code == 200
        shown = answer(client.get(f"/keys/{created['id']}"), 200)
    assert shown["day_used"] == 3
    assert shown["requests"] == 3
