"""edge/proxy.py pure helpers and edge/errors.py rendering. No I/O."""

from __future__ import annotations

import orjson
import pytest

from edge import errors
from edge.proxy import inbound_headers, response_headers, unsafe_path


@pytest.mark.parametrize(
    "path",
    [
        b"/v1/../admin",
        b"/v1/./models",
        b"/v1/%2e%2e/admin",
        b"/v1/%2E%2E/admin",
        b"/v1/a%2F..%2Fb",
        b"/v1/a%5c..",
        b"/v1/a\\b",
        b"/v1/a%00b",
        b"/v1/caf\xc3\xa9",
    ],
)
def test_unsafe_paths(path: bytes) -> None:
    assert unsafe_path(path)


@pytest.mark.parametrize(
    "path",
    [
        b"/v1/chat/completions",
        b"/v1/models/gpt-4.1-mini",
        b"/v1/files/file-abc.jsonl/content",
        b"/v1/a%20b",
        b"/v1/...",
    ],
)
def test_safe_paths(path: bytes) -> None:
    assert not unsafe_path(path)


def test_response_headers_drop_hop_by_hop_and_replaced_ones() -> None:
    raw = (
        (b"Content-Type", b"text/event-stream"),
        (b"Connection", b"keep-alive, X-Up"),
        (b"X-Up", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
        (b"x-ratelimit-limit-requests", b"10000"),
        (b"x-ratelimit-remaining-tokens", b"5"),
        (b"openai-organization", b"org-operator"),
        (b"Content-Encoding", b"gzip"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"x-request-id", b"req_1"),
    )
    assert response_headers(raw) == [
        (b"content-type", b"text/event-stream"),
        (b"content-encoding", b"gzip"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"x-request-id", b"req_1"),
    ]


def test_inbound_headers_drop_hop_by_hop_credentials_and_framing() -> None:
    raw = [
        (b"host", b"edge"),
        (b"authorization", b"Bearer gw_sk_x"),
        (b"connection", b"keep-alive, X-Secret"),
        (b"x-secret", b"1"),
        (b"keep-alive", b"5"),
        (b"te", b"trailers"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"h2c"),
        (b"proxy-authorization", b"Basic x"),
        (b"proxy-connection", b"keep-alive"),
        (b"api-key", b"gw_sk_x"),
        (b"x-api-key", b"gw_sk_x"),
        (b"expect", b"100-continue"),
        (b"content-length", b"12"),
        (b"content-type", b"application/json"),
        (b"accept-encoding", b"gzip"),
        (b"user-agent", b"OpenAI/Python 1.0 \xe9"),
    ]
    inbound = inbound_headers(raw)
    assert inbound.headers == [
        ("content-type", "application/json"),
        ("accept-encoding", "gzip"),
        ("user-agent", "OpenAI/Python 1.0 \xe9"),
    ]
    assert inbound.auth == b"Bearer gw_sk_x"
    assert inbound.length == b"12"


def test_repeated_authorization_counts_as_none() -> None:
    raw = [(b"authorization", b"Bearer a"), (b"authorization", b"Bearer a")]
    assert inbound_headers(raw).auth is None
    assert inbound_headers([]).auth is None


def test_errors_have_openai_shape() -> None:
    for err in (
        errors.InvalidApiKey(),
        errors.PermissionDenied("paused"),
        errors.RateLimited("slow down"),
        errors.ServiceUnavailable(),
        errors.UpstreamUnreachable(),
        errors.UpstreamTimeout(),
        errors.PayloadTooLarge("big"),
        errors.status_error(404),
        errors.status_error(405),
        errors.status_error(418),
    ):
        body = orjson.loads(err.body())
        assert set(body) == {"error"}
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["param"] is None
        assert body["error"]["message"]


def test_error_statuses_and_codes() -> None:
    assert (errors.InvalidApiKey.status, errors.InvalidApiKey.code) == (401, "invalid_api_key")
    assert errors.PermissionDenied.type == "permission_error"
    assert errors.RateLimited.code == "rate_limit_exceeded"
    assert errors.ServiceUnavailable.type == "service_unavailable"
    assert errors.UpstreamUnreachable.status == 502 and errors.UpstreamTimeout.status == 504
    assert errors.UpstreamTimeout.type == errors.UpstreamUnreachable.type == "upstream_error"
