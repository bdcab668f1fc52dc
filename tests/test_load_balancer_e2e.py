"""Many instances, one truth: two edge processes behind a real nginx (keep-alive upstream pool)
on one Redis. A burst through the balancer admits exactly the key's limit across both; a
pause, revoke or limit change made through one instance holds on the other at the very next
request (edge caches no key state)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.edge_process import EdgeProcess, auth, edge_env
from tests.support.fake_upstream import FakeUpstream
from tests.support.metrics import scrape, value
from tests.support.nginx import Nginx
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.multiproc
TOKEN = "balancer-admin-token-0123456789"


@pytest.fixture
def balanced(
    tmp_path: Path,
    spawn_edge: Callable[..., EdgeProcess],
    redis_server: RedisServer,
    upstream: FakeUpstream,
) -> Iterator[tuple[Nginx, EdgeProcess, EdgeProcess]]:
    env = edge_env(
        redis_server.url,
        upstream.url,
        EDGE_ADMIN_TOKEN=TOKEN,
        EDGE_SERVER_TRUSTED_PROXIES="127.0.0.1/32",
    )
    a, b = spawn_edge(env, name="lb-a"), spawn_edge(env, name="lb-b")
    nginx = Nginx(tmp_path / "nginx", [a.port, b.port]).start()
    yield nginx, a, b
    nginx.stop()


def admin(proc: EdgeProcess, method: str, path: str, **body: object) -> dict[str, object]:
    resp = httpx.request(method, f"{proc.url}/admin{path}", headers=auth(TOKEN), json=body or None)
    assert resp.status_code in (200, 201), resp.text
    return resp.json()  # type: ignore[no-any-return]


def handled(proc: EdgeProcess) -> float:
    samples = scrape(proc.url)
    return sum(
        value(samples, "edge_requests_total", plan="free", outcome=o)
        for o in ("allowed", "rate_limited_minute")
    )


async def burst(url: str, key: str, n: int) -> Counter[int]:
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(headers=auth(key), limits=limits, timeout=20) as client:
        answers = await asyncio.gather(*(client.get(f"{url}/v1/models") for _ in range(n)))
    return Counter(r.status_code for r in answers)


def test_two_instances_behind_nginx_share_one_truth(
    balanced: tuple[Nginx, EdgeProcess, EdgeProcess], upstream: FakeUpstream
) -> None:
    nginx, a, b = balanced
    created = admin(a, "POST", "/keys", plan="free")
    key = str(created["key"])
    before = [handled(p) for p in (a, b)]
    assert asyncio.run(burst(nginx.url, key, 60)) == {200: 20, 429: 40}
    assert len(upstream.records) == 20
    spread = [handled(p) - n for p, n in zip((a, b), before, strict=True)]
    assert sum(spread) == 60 and min(spread) > 0, spread  # both instances took part
    # nginx is trusted: the client's address it passed on, then nginx's own
    assert {r.header("x-forwarded-for") for r in upstream.records} == {"127.0.0.1, 127.0.0.1"}

    fresh = admin(b, "POST", "/keys", plan="pro")
    key, kid = str(fresh["key"]), str(fresh["id"])
    status = {p: (lambda p=p: httpx.get(f"{p.url}/v1/models", headers=auth(key)))
              for p in (a, b)}  # fmt: skip
    assert status[a]().status_code == 200
    admin(a, "POST", f"/keys/{kid}/pause")
    assert status[b]().status_code == 403
    admin(b, "POST", f"/keys/{kid}/resume")
    assert status[a]().status_code == 200
    admin(a, "PATCH", f"/keys/{kid}", rpm=5)
    assert status[b]().headers["x-ratelimit-limit-requests"] == "5"
    admin(b, "POST", f"/keys/{kid}/revoke")
    assert status[a]().status_code == 401
