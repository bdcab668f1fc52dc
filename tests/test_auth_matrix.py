"""T22 (docs/testplan.md) `test_malformed_authorization_matrix`: every bad credential gets the same
clear 401 (OpenAI's error shape, code `invalid_api_key`) without any Redis I/O and without
reflecting what was presented; a lower-case `bearer` scheme is accepted (RFC 9110 §11.1: the
auth-scheme is case-insensitive); an unknown but well-formed key costs exactly one EVALSHA.
A bare `Authorization: <key>` is a key (keys.headers), so the matrix's scheme-less case carries
a key with a wrong checksum; one header repeated, or two headers with different keys, are bad.

Requests go over raw sockets, so header bytes reach edge exactly as written (tabs, non-ASCII,
repeated headers) instead of being validated or normalised by an HTTP client library.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import httpx
import pytest

from edge import keys
from edge.control.records import KeyRecord
from tests.support.edge_process import PROVIDER_KEY, EdgeProcess
from tests.support.fake_upstream import FakeUpstream
from tests.support.keys import secret_part
from tests.support.monitor import CommandCounter
from tests.support.raw_http import RawResponse, raw_get
from tests.support.redis_server import RedisServer

PREFIX = "gw_sk_"
FMT = keys.KeyFormat(PREFIX)
MakeKey = Callable[..., tuple[str, KeyRecord]]


def with_checksum(body: str) -> str:
    """`body` with a correct checksum appended, so only the defect under test is a defect."""
    raw = body.encode("latin-1")
    return (raw + keys.checksum(raw)).decode("latin-1")


def flip(ch: str) -> str:
    return "B" if ch == "A" else "A"


def malformed_cases(key: str) -> dict[str, tuple[list[bytes], bytes]]:
    """name → (Authorization header lines, the token bytes that must not be reflected)."""
    kid, secret = key[len(PREFIX) : len(PREFIX) + keys.KID_LEN], secret_part(key)
    stem = PREFIX + kid

    def bearer(token: str | bytes) -> tuple[list[bytes], bytes]:
        raw = token.encode("latin-1") if isinstance(token, str) else token
        return [b"Authorization: Bearer " + raw], raw

    basic = base64.b64encode(f"user:{key}".encode()).decode()
    other = keys.make_key(PREFIX, keys.new_kid()).encode()  # well-formed: a conflicting key
    wrong_checksum = stem + flip(secret[0]) + secret[1:] + key[-keys.CHECKSUM_LEN :]
    return {
        "missing": ([], b""),
        "bearer-alone": ([b"Authorization: Bearer"], b""),
        "basic": ([f"Authorization: Basic {basic}".encode()], basic.encode()),
        "double-space": ([f"Authorization: Bearer  {key}".encode()], key.encode()),
        "tab": ([f"Authorization: Bearer\t{key}".encode()], key.encode()),
        "two-headers": ([f"Authorization: Bearer {key}".encode()] * 2, key.encode()),
        "no-scheme-wrong-checksum": (
            [f"Authorization: {wrong_checksum}".encode()],
            wrong_checksum.encode(),
        ),
        "api-key-twice": ([f"api-key: {key}".encode()] * 2, key.encode()),
        "two-keys": ([f"Authorization: Bearer {key}".encode(), b"x-api-key: " + other], b""),
        "wrong-prefix": bearer("sk-" + key[len(PREFIX) :]),
        "other-prefix": bearer("gw_pk_" + key[len(PREFIX) :]),
        "one-short": bearer(with_checksum(stem + secret[:-1])),
        "one-long": bearer(with_checksum(stem + secret + "a")),
        "truncated": bearer(key[:-1]),
        "alphabet-dash": bearer(with_checksum(stem + secret[:-1] + "-")),
        "alphabet-underscore": bearer(with_checksum(stem + secret[:-1] + "_")),
        "alphabet-bang": bearer(with_checksum(stem + secret[:-1] + "!")),
        "wrong-checksum": bearer(wrong_checksum),
        "trailing-x": bearer(key + "x"),
        "trailing-word": bearer(key + " extra"),
        "latin-1": bearer(with_checksum(stem + secret[:-1] + "\xe9")),
        "utf-8": bearer(key[:20].encode() + "é€".encode() + key[22:].encode()),
        "valid-plus-high-byte": bearer(key.encode() + b"\xff"),
        "10kb": bearer(PREFIX + "A" * 10_240),
    }


CASE_NAMES = list(malformed_cases(keys.make_key(PREFIX, keys.new_kid())))


def assert_invalid_api_key(resp: RawResponse | httpx.Response) -> None:
    if isinstance(resp, RawResponse):
        status, ctype, body = resp.status, resp.header("content-type"), resp.body
    else:
        status, ctype, body = resp.status_code, resp.headers["content-type"], resp.content
    assert status == 401, body
    assert ctype == "application/json"
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_api_key"
    assert error["param"] is None
    assert isinstance(error["message"], str) and error["message"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_malformed_authorization_matrix(
    case: str, edge: EdgeProcess, redis_server: RedisServer, make_key: MakeKey
) -> None:
    key, _ = make_key()
    lines, presented = malformed_cases(key)[case]

    with CommandCounter(redis_server.port) as counter:
        resp = raw_get(edge.port, lines)

    assert_invalid_api_key(resp)
    assert counter.commands == [], f"{case}: malformed credentials must cost no Redis I/O"
    if presented:
        assert presented not in resp.raw, f"{case}: the response reflects the presented token"
    assert key.encode() not in resp.raw
    assert secret_part(key).encode() not in resp.raw


def test_lowercase_bearer_scheme_is_accepted(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key()
    for scheme in ("bearer", "BEARER", "BeArEr"):
        resp = httpx.get(
            f"{edge.url}/v1/models", headers={"Authorization": f"{scheme} {key}"}, timeout=10
        )
        assert resp.status_code == 200, (scheme, resp.text)
    assert len(upstream.records) == 3
    for record in upstream.records:
        assert record.headers("authorization") == [f"Bearer {PROVIDER_KEY}"]


def test_unknown_well_formed_key_costs_one_evalsha(
    edge: EdgeProcess, redis_server: RedisServer, upstream: FakeUpstream
) -> None:
    unknown = keys.make_key(PREFIX, keys.new_kid())
    assert FMT.parse(unknown.encode()) is not None, "the probe key must be well-formed"

    with CommandCounter(redis_server.port) as counter:
        resp = raw_get(edge.port, [f"Authorization: Bearer {unknown}".encode()])

    assert_invalid_api_key(resp)
    assert counter.commands == ["EVALSHA"]
    assert unknown.encode() not in resp.raw
    assert upstream.records == []
