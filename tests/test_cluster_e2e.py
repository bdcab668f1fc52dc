"""edge on a real 3-master Redis Cluster (the basics of T13 in docs/testplan.md): keys land on
several masters, every admission touches one slot, limits stay exact, listing spans all masters."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edge.control.specs import KeyUpdate, NewKey
from edge.control.store import Conflict, KeyStore
from edge.keys import bucket_keys, record_key
from tests.support.edge_process import auth, edge_env
from tests.support.fake_upstream import FakeUpstream
from tests.support.keys import new_key, store_call
from tests.support.metrics import scrape, value
from tests.support.redis_cluster import RedisCluster

pytestmark = pytest.mark.cluster


def test_cluster_admission_exact_and_single_slot(
    spawn_edge, redis_cluster: RedisCluster, upstream: FakeUpstream
) -> None:
    keys = [new_key(redis_cluster.url, "free", rpm=5, rpd=100) for _ in range(12)]
    owners = {redis_cluster.node_for(record_key(rec.id)).port for _, rec in keys}
    assert len(owners) >= 2

    client = redis_cluster.nodes[0].client()
    for _, rec in keys:
        slots = {client.cluster("keyslot", k) for k in (record_key(rec.id), *bucket_keys(rec.id))}
        assert len(slots) == 1
    client.close()

    proc = spawn_edge(edge_env(redis_cluster.url, upstream.url))

    async def burst(key: str) -> Counter[int]:
        async with httpx.AsyncClient(
            base_url=proc.url, headers={"Authorization": f"Bearer {key}"}, timeout=20
        ) as c:
            return Counter(
                r.status_code
                for r in await asyncio.gather(*(c.get("/v1/models") for _ in range(30)))
            )

    for key, _ in keys[:3]:
        assert asyncio.run(burst(key)) == {200: 5, 429: 25}
    assert len(upstream.records) == 15

    listed = store_call(redis_cluster.url, lambda store: store.all_keys())
    assert {rec.id for _, rec in keys} <= {r.id for r in listed}


def test_cluster_key_management(redis_cluster: RedisCluster) -> None:
    """The operator plane on a cluster: the owner cap (reserved on the owner's own slot),
    cursor pages over the one listing index, updates, credits and the audit stream."""
    owner = f"cluster-owner-{uuid.uuid4().hex[:8]}"

    async def scenario(store: KeyStore) -> None:
        store.owners.cap = 5
        created = [await store.create(NewKey(plan="free", owner=owner), "test") for _ in range(5)]
        with pytest.raises(Conflict):
            await store.create(NewKey(plan="free", owner=owner), "test")
        kids = [rec.id for _, rec in created]
        await store.set_status(kids[0], "revoked", "test")
        await store.create(NewKey(plan="free", owner=owner, credits=3), "test")

        seen: list[str] = []
        cursor = None
        while True:
            page = await store.list_page(owner=owner, cursor=cursor, limit=2)
            seen += [r.id for r in page.records]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert len(seen) == len(set(seen)) == 6
        assert set(kids) <= set(seen)

        await store.update(kids[1], KeyUpdate(rpm=7), "test")
        assert (await store.get(kids[1])).rpm == 7
        entries, _ = await store.audit.page(None, 50)
        assert {"create", "revoke", "update"} <= {e["action"] for e in entries}

    store_call(redis_cluster.url, scenario)


@pytest.fixture
def replicated_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """3 masters with a replica each (6 nodes), replicas linked."""
    cluster = RedisCluster(tmp_path / "replicated", masters=3, replicas=1).start()
    yield cluster
    cluster.stop()


@pytest.mark.slow
def test_cluster_failover_of_a_keys_master(
    spawn_edge, replicated_cluster: RedisCluster, upstream: FakeUpstream
) -> None:
    """T14: SIGKILL the master that owns a key's slot: while the replica takes over, requests
    get fast 503s (never a hang past redis.timeout and one slot-map refresh); then 200s from
    the promoted replica without restarting edge, its empty script cache handled (NOSCRIPT),
    and no more admitted than the key's capacity. Key listing and lifecycle still work."""
    cluster = replicated_cluster
    proc = spawn_edge(edge_env(cluster.url, upstream.url))
    key, rec = new_key(cluster.url, "free", rpm=30, rpd=1000)
    with httpx.Client(base_url=proc.url, headers=auth(key), timeout=10) as client:
        assert client.get("/v1/models").status_code == 200
        noscript = value(scrape(proc.url), "edge_redis_errors_total", kind="noscript")
        master = cluster.node_for(record_key(rec.id))
        master.kill()
        killed = time.monotonic()
        statuses: list[int] = []
        slowest = 0.0
        while time.monotonic() - killed < 20:
            start = time.perf_counter()
            status = client.get("/v1/models").status_code
            slowest = max(slowest, time.perf_counter() - start)
            statuses.append(status)
            if status == 200:
                break
            assert status == 503
            time.sleep(0.05)
        recovered = time.monotonic() - killed
        assert statuses[-1] == 200, f"no recovery within 20 s: {Counter(statuses)}"
        assert slowest < 1.5, f"a request took {slowest:.2f} s during the failover"
        admitted = 1 + sum(
            client.get("/v1/models").status_code == 200 for _ in range(40)
        )  # fmt: skip
        assert admitted <= 30, "more admitted after the failover than the key's capacity"
    assert value(scrape(proc.url), "edge_redis_errors_total", kind="noscript") > noscript
    listed = store_call(cluster.url, lambda store: store.all_keys())
    assert rec.id in {r.id for r in listed}
    paused = store_call(cluster.url, lambda store: store.set_status(rec.id, "paused", "test"))
    assert paused.status == "paused"
    print(f"failover: {len(statuses)} requests, recovered after {recovered:.1f} s")
