"""The Redis clients, chosen by URL scheme.

- empty URL: an embedded, in-process fakeredis server with Lua, for trying edge out;
- `redis://`, `rediss://`, `unix://`: one Redis server;
- `redis+cluster://[user:pass@]h1:p1[,h2:p2…]`: a Redis Cluster, given its seed nodes.

Two clients per app: redis-py for everything off the hot path (admin, listing, the CLI), and
for the one admission command per request edge's pipelined client on a single server
(`redis/hot.py`; redis-py itself on a cluster or the embedded server). Both are built from the
same parsed URL, TLS options included. Every command has an explicit deadline and redis-py's
automatic retries are off: a retried admission script could charge a key twice (docs/guarantees.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge.redis.hot import PipelinedRedis
from edge.redis_urls import CLUSTER_SCHEME, parse_cluster_url
from edge.settings import RedisSettings

if TYPE_CHECKING:
    from edge.redis.types import ScriptClient


def _no_retry() -> Any:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Retry(NoBackoff(), 0)


def connect(settings: RedisSettings) -> Any:
    """A new async redis-py client for `settings.url`; no I/O happens until its first command."""
    if not settings.url:
        return embedded()
    common: dict[str, Any] = {
        "socket_timeout": settings.timeout,
        "socket_connect_timeout": settings.timeout,
        "retry": _no_retry(),
        "driver_info": None,
        "max_connections": settings.max_connections,
    }
    if settings.url.startswith(CLUSTER_SCHEME):
        return _cluster(settings.url, common)
    from redis.asyncio import Redis

    return Redis.from_url(settings.url, **common)


def hot_path(settings: RedisSettings, client: Any) -> ScriptClient:
    """The client for the one admission command per request: edge's pipelined client for a
    single server (see `redis/hot.py` for why), else `client` itself (cluster, embedded)."""
    if settings.url.startswith(("redis://", "rediss://", "unix://")):
        return PipelinedRedis(settings.url, settings.timeout)
    return client  # type: ignore[no-any-return]


def embedded() -> Any:
    """An in-process fakeredis server with Lua: one instance, nothing persisted."""
    import fakeredis

    return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), driver_info=None)


def _cluster(url: str, common: dict[str, Any]) -> Any:
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    user, password, nodes = parse_cluster_url(url)
    common.pop("max_connections")
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in nodes],
        username=user,
        password=password,
        **common,
    )
