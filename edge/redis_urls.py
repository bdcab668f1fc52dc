"""Redis URLs: which ones edge accepts, and what they say. Checked at start-up, without I/O.

One parse for both of edge's Redis clients, so they agree on every option: redis-py's own
(`parse_redis_url`) for `redis://`, `rediss://` and `unix://`, and `parse_cluster_url` for a
cluster's seed nodes. redis-py is imported only when a URL is checked or parsed.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import urlsplit

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
