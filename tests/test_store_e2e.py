"""edge/control/store.py lifecycle semantics through a real edge process: rotation grace, expiry,
and what admission writes back (last_used, request count)."""

from __future__ import annotations

import httpx
import redis

from edge.keys import key_hash, make_key, new_kid, record_key
from tests.support.edge_process import EdgeProcess, auth
from tests.support.keys import new_key, store_call
from tests.support.redis_server import RedisServer


def status(edge: EdgeProcess, key: str) -> httpx.Response:
    return httpx.get(f"{edge.url}/v1/models", headers=auth(key), timeout=10)


def test_rotation_grace_keeps_the_old_key_until_redis_time_passes_it(
    edge: EdgeProcess, redis_server: RedisServer, r: redis.Redis, make_key
) -> None:
    old, rec = make_key()
    new, rotated = store_call(redis_server.url, lambda s: s.rotate(rec.id, 3600, "test"))
    assert new != old and rotated.id == rec.id
    assert rotated.previous_key_valid_until is not None
    assert status(edge, old).status_code == 200
    assert status(edge, new).status_code == 200
    now = int(r.time()[0])
    r.hset(record_key(rec.id), "prev_until", now - 1)  # the grace period is over
    assert status(edge, old).status_code == 401
    assert status(edge, new).status_code == 200
    # revoking drops the rotated-out key too, and revocation is final
    store_call(redis_server.url, lambda s: s.set_status(rec.id, "revoked", "test"))
    assert status(edge, new).status_code == 401


def test_expired_key_is_401_saying_so(edge: EdgeProcess, r: redis.Redis, make_key) -> None:
    key, rec = make_key(expires_in=3600)
    assert rec.expires is not None and rec.created is not None
    assert rec.expires - rec.created == 3600
    assert status(edge, key).status_code == 200
    r.hset(record_key(rec.id), "expires", int(r.time()[0]))
    resp = status(edge, key)
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "invalid_api_key"
    assert "expired" in resp.json()["error"]["message"]


def test_admission_records_last_used_and_request_count(
    edge: EdgeProcess, redis_server: RedisServer, r: redis.Redis, make_key
) -> None:
    key, rec = make_key(rpm=2)
    assert rec.last_used is None and rec.requests == 0
    codes = [status(edge, key).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    after = store_call(redis_server.url, lambda s: s.get(rec.id))
    assert after.requests == 2  # rejections are not counted
    assert after.last_used is not None
    assert abs(after.last_used - int(r.time()[0])) <= 5


def test_first_listing_indexes_old_records_once(redis_factory) -> None:
    """Records from before the listing index are indexed by the first listing; keys the store
    created (already indexed) are not added a second time."""
    server = redis_factory()
    made = [new_key(server.url, "free", owner="idx") for _ in range(3)]
    legacy_kid = new_kid()
    legacy = make_key("gw_sk_", legacy_kid)
    client = server.client()
    client.hset(
        record_key(legacy_kid),
        mapping={"hash": key_hash(legacy), "plan": "free", "owner": "idx", "created": 1},
    )
    client.close()
    everyone = store_call(server.url, lambda s: s.all_keys())
    ids = [r.id for r in everyone]
    assert sorted(ids) == sorted([rec.id for _, rec in made] + [legacy_kid])
    assert ids[0] == legacy_kid  # oldest first: created at 1
    mine = store_call(server.url, lambda s: s.all_keys("idx"))
    assert len(mine) == 4


def test_one_key_s_audit_entries_are_found_past_the_first_scan_step(redis_factory) -> None:
    """`GET /admin/audit?key=`: the stream is read back SCAN_STEP entries at a time; a key's
    entries older than the first step are still found, newest first, `limit` at most."""
    from edge.control.audit import SCAN_STEP

    server: RedisServer = redis_factory()

    async def scenario(store) -> tuple[list[dict], str | None, list[dict], str | None]:
        mine = new_kid()
        for i in range(3):
            await store.audit.record("update", mine, "", "test", {"n": i})
        for i in range(SCAN_STEP + 50):
            await store.audit.record("update", new_kid(), "", "test", {"n": i})
        first, cursor = await store.audit.page(None, 2, mine)
        rest, after = await store.audit.page(cursor, 2, mine)
        return first, cursor, rest, after

    first, cursor, rest, after = store_call(server.url, scenario)
    assert [e["changes"]["n"] for e in first] == [2, 1] and cursor == first[-1]["id"]
    assert [e["changes"]["n"] for e in rest] == [0] and after is None
