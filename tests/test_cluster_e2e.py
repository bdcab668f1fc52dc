"""edge on a real 3-master Redis Cluster (the basics of TESTPLAN T13): keys land on several
masters, every admission touches one slot, limits stay exact, listing spans all masters."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import pytest

from edge.keys import bucket_keys, record_key
from tests.support.edge_process import edge_env
from tests.support.fake_upstream import FakeUpstream
from tests.support.keys import new_key, store_call
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
