"""The Redis clients, chosen by URL scheme.

- empty URL: an embedded, in-process fakeredis server with Lua, for trying edge out;
- `redis://`, `rediss://`, `unix://`: one Redis server;
- `redis+cluster://[user:pass@]h1:p1[,h2:p2…]`: a Redis Cluster, given its seed nodes.

Two clients per app: redis-py for everything off the hot path (admin, listing, the CLI), and
for the one admission command per request edge's pipelined client on a single server
(`hot_redis.py`; redis-py itself on a cluster or the embedded server). Both are built from the
same parsed URL, TLS options included. Every command has an explicit deadline and redis-py's
automatic retries are off: a retried admission script could charge a key twice (DESIGN §5).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from edge.settings import RedisSettings

if TYPE_CHECKING:
    from edge.redis_types import ScriptClient

CLUSTER_SCHEME = "redis+cluster://"


# The URL query options edge honours, on both of its clients; anything else is an error rather
# than silently ignored (a typo in `ssl_ca_certs` must not surface as a failed handshake later).
URL_OPTIONS = frozenset({"db", "client_name"})
TLS_OPTIONS = frozenset(
    {
        "ssl_keyfile",
        "ssl_certfile",
        "ssl_password",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_data",
        "ssl_ca_path",
        "ssl_check_hostname",
        "ssl_min_version",
        "ssl_ciphers",
        "ssl_include_verify_flags",
        "ssl_exclude_verify_flags",
    }
)


def check_url(url: str) -> None:
    """Raise ValueError (with a reason, never the URL: it may hold a password) unless `url`
    is a Redis URL edge can use. No I/O."""
    if not url.startswith(("redis://", "rediss://", "unix://", CLUSTER_SCHEME)):
        raise ValueError("must start with redis://, rediss://, unix:// or redis+cluster://")
    if url.startswith(CLUSTER_SCHEME):
        parse_cluster_url(url)
        return
    from redis.exceptions import RedisError

    try:
        params = parse_redis_url(url)
        if params.get("path") is None and not params.get("host"):
            raise ValueError("it has no host")
        db = urlsplit(url).path.strip("/")
        if not url.startswith("unix://") and db and not db.isdigit():
            raise ValueError("the database after the host must be a number")
        allowed = URL_OPTIONS | (TLS_OPTIONS if url.startswith("rediss://") else frozenset())
        unknown = sorted(set(params) - allowed - {"host", "port", "path", "username", "password"})
        if unknown:
            raise ValueError(f"unsupported option(s) {', '.join(unknown)}")
        if url.startswith("rediss://"):
            tls_context(params)  # bad certificate options fail here, at start-up
    except (ValueError, TypeError, OSError, RedisError) as exc:
        raise ValueError(f"is not a usable Redis URL: {_reason(exc)}") from None


def parse_redis_url(url: str) -> dict[str, Any]:
    """redis-py's own parse of a redis://, rediss:// or unix:// URL, minus its connection class."""
    from redis.asyncio.connection import parse_url

    params = dict(parse_url(url))
    params.pop("connection_class", None)
    return params


def tls_context(params: dict[str, Any]) -> ssl.SSLContext:
    """The TLS context redis-py's SSLConnection would build from these parsed URL options
    (its defaults included: certificates required, host name checked)."""
    from redis.asyncio.connection import RedisSSLContext

    options = {k[len("ssl_") :]: v for k, v in params.items() if k.startswith("ssl_")}
    options.setdefault("cert_reqs", "required")
    options.setdefault("check_hostname", True)
    return RedisSSLContext(**options).get()


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text if "@" not in text and "//" not in text else type(exc).__name__


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
    single server (see `hot_redis.py` for why), else `client` itself (cluster, embedded)."""
    if settings.url.startswith(("redis://", "rediss://", "unix://")):
        from edge.hot_redis import PipelinedRedis

        return PipelinedRedis(settings.url, settings.timeout)
    return client  # type: ignore[no-any-return]


def embedded() -> Any:
    """An in-process fakeredis server with Lua: one instance, nothing persisted."""
    import fakeredis

    return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), driver_info=None)


def parse_cluster_url(url: str) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    """Username, password and seed nodes of `redis+cluster://[user:pass@]h1:p1[,h2:p2…]`;
    ValueError when a node is malformed."""
    netloc = url[len(CLUSTER_SCHEME) :].split("/", 1)[0]
    userinfo, _, hosts = netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    nodes = []
    for part in hosts.split(","):
        try:
            parsed = urlsplit(f"//{part}")
            port = parsed.port
        except ValueError as exc:
            raise ValueError(f"bad cluster node {part!r}: {exc}") from None
        if not parsed.hostname or port == 0:
            raise ValueError(f"bad cluster node {part!r}: give host:port")
        nodes.append((parsed.hostname, port or 6379))
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
