"""The upstream client's failures, and what each says about the request: `timeout` (a
deadline passed: 504) and `never_sent` (the upstream provably never received it: its credit is
refunded). The proxy translates them into edge's errors, in one place."""

from __future__ import annotations


class UpstreamError(Exception):
    """The exchange with the upstream failed. `timeout`: a deadline passed; `never_sent`: the
    upstream provably never received the request."""

    timeout = False
    never_sent = False


class ConnectFailed(UpstreamError):
    never_sent = True


class ConnectTimeout(UpstreamError):
    timeout = never_sent = True


class PoolFull(UpstreamError):
    """Every connection the pool may open was busy for `connect_timeout`: edge's own limit
    (`upstream.max_connections`), not a slow upstream."""

    never_sent = True


class ReadTimeout(UpstreamError):
    timeout = True


class Disconnected(UpstreamError):
    """The connection closed or reset before the answer was whole."""


class BadResponse(UpstreamError):
    """The upstream's bytes are not an HTTP/1.1 answer edge can relay."""


def describe(exc: BaseException) -> str:
    """An exception's class and message, without a URL's query string."""
    text = str(exc).split("?", 1)[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
