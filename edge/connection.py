"""The Redis client, chosen by URL scheme.

- empty URL: an embedded, in-process fakeredis server with Lua, for trying edge out;
- `redis://`, `rediss://`, `unix://`: one Redis server;
- `redis+cluster://h1:p1[,h2:p2…]`: a Redis Cluster, given its seed nodes.

On the hot path every command has an explicit deadline and redis-py's automatic retries are off:
a retried admission script could charge a key twice (DESIGN §5). The client also skips the
`CLIENT SETINFO` handshake, so a new connection costs no extra commands.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from edge.settings import RedisSettings

CLUSTER_SCHEME = "redis+cluster://"


def _no_retry() -> Any:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Retry(NoBackoff(), 0)


def connect(settings: RedisSettings) -> Any:
    """A new async Redis client for `settings.url`; no I/O happens until its first command."""
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


def hot_path(settings: RedisSettings, client: Any) -> Any:
    """The client for the one admission command per request: edge's pipelined RESP client for
    a single server (see `resp.py` for why), else `client` itself (cluster, embedded)."""
    if settings.url.startswith(("redis://", "rediss://", "unix://")):
        from edge.resp import RespClient

        return RespClient(settings.url, settings.timeout)
    return client


def embedded() -> Any:
    """An in-process fakeredis server with Lua: one instance, nothing persisted."""
    import fakeredis

    return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), driver_info=None)


def parse_cluster_url(url: str) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    """Username, password and seed nodes of `redis+cluster://[user:pass@]h1:p1[,h2:p2…]`."""
    netloc = url[len(CLUSTER_SCHEME) :].split("/", 1)[0]
    userinfo, _, hosts = netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    nodes = []
    for part in hosts.split(","):
        parsed = urlsplit(f"//{part}")
        nodes.append((parsed.hostname or "127.0.0.1", parsed.port or 6379))
    return user or None, password or None, nodes


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
