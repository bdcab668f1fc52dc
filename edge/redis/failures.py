"""Redis failures, translated once: whatever redis-py or a socket raises becomes
`errors.RedisUnavailable`, with a `kind` for `edge_redis_errors_total` (timeout, connection,
noscript, other). Every module that talks to Redis goes through here, and only here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from redis import exceptions as rex

from edge.errors import RedisUnavailable

FAILURES = (rex.RedisError, OSError, TimeoutError)
"""What a Redis call may raise when Redis, not edge, is at fault."""


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, rex.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, rex.ConnectionError | ConnectionError | OSError):
        return "connection"
    if isinstance(exc, rex.NoScriptError):
        return "noscript"
    return "other"


@contextlib.contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Translate whatever redis-py or the socket raises inside into `RedisUnavailable`."""
    try:
        yield
    except (rex.RedisError, OSError) as exc:
        raise translate(exc, what) from None


def translate(exc: rex.RedisError | OSError, what: str) -> RedisUnavailable:
    if isinstance(exc, rex.ResponseError):
        return RedisUnavailable("other", f"{what}: {exc}")
    return RedisUnavailable(error_kind(exc), f"{what}: {type(exc).__name__}: {exc}")
