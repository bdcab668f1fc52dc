"""What a client may not do through edge, proved over raw sockets against real edge processes.

Each test reproduces an attack that worked before the fix and holds edge to the contract:

1. TRACE, CONNECT and unknown methods (PROPFIND) are answered 405 with `Allow`, before Redis
   and the upstream: a TRACE forwarded to a server that echoes it handed back the provider key.
2. For a key with model scopes, a body with more than one top-level key equal to "model"
   ignoring case (after unescaping) is a 400: edge read one `model`, a Go upstream ran
   another. An over-long model is a 400 `model_too_long`. Keys without scopes are unaffected.
3. Chunked trailer fields never become request headers (an `Authorization` trailer admitted a
   request; `X-Trailer-Test` reached the upstream), and they count against the header limits.
4. Before a key is admitted, edge holds nothing a client sends: (a) no key, 8 MB of trailers;
   (b) a forged key (valid checksum, a real model-scoped key id), 30 MB bodies, each answered
   401 before its body is read; (c) a body trickled slowly is cut by `server.body_timeout`.
5. A head pipelined behind another request in the same write is held to
   `server.max_header_bytes` like any other.
6. Forwarding headers (any `X-Forwarded-*`, `Forwarded`, `X-Real-IP`, `True-Client-IP`, …,
   underscore spellings included) from an untrusted client never reach the upstream.
7. `..;`, `.;` and double-encoded dot segments are refused as `invalid_path`.
"""

from __future__ import annotations

import json
import re
import secrets
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis

from edge.control.records import KeyRecord
from edge.keys import ALPHABET, KID_LEN, SECRET_LEN, checksum, record_key
from tests.support.edge_process import PROVIDER_KEY, EdgeProcess, auth, edge_env
from tests.support.fake_upstream import FakeUpstream
from tests.support.monitor import CommandCounter
from tests.support.procinfo import peak_rss, reset_peak_rss
from tests.support.raw_http import (
    RawResponse,
    chunked,
    exchange,
    parse_response,
    raw_get,
    request_head,
    split_responses,
)
from tests.support.redis_server import RedisServer

MakeKey = Callable[..., tuple[str, KeyRecord]]
Spawn = Callable[..., EdgeProcess]
MB = 1024 * 1024
PREFIX = "gw_sk_"
ALLOWED = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
SPOOF_IP = "6.6.6.6"
SPOOF_HOST = "evil.example"


# --- helpers ---------------------------------------------------------------------------------


def scoped_key(make_key: MakeKey, r: redis.Redis, **scopes: list[str]) -> tuple[str, str]:
    """A fresh key with `scopes` written on its record, as an operator would set them."""
    key, rec = make_key("pro")
    r.hset(record_key(rec.id), "scopes", json.dumps(scopes))
    return key, rec.id


def json_error(answer: RawResponse) -> dict[str, Any]:
    """The `error` object of one of edge's own JSON answers."""
    assert answer.header("content-type") == "application/json", answer.raw[:300]
    error: dict[str, Any] = json.loads(answer.body)["error"]
    return error


def assert_edge_error(
    answer: RawResponse, status: int, code: str, param: str | None = None
) -> None:
    assert answer.status == status, answer.raw[:400]
    error = json_error(answer)
    assert (error["type"], error["code"]) == ("invalid_request_error", code), error
    if param is not None:
        assert error["param"] == param, error


def post_json(edge: EdgeProcess, key: str, body: bytes, **extra: str) -> httpx.Response:
    headers = auth(key, **{"Content-Type": "application/json", **extra})
    return httpx.post(f"{edge.url}/v1/responses", headers=headers, content=body, timeout=10)


def forged_key(real: str) -> str:
    """A token with `real`'s prefix and key id, a random secret and a correct checksum: it
    passes every check edge can make without Redis."""
    kid = real[len(PREFIX) : len(PREFIX) + KID_LEN]
    body = (PREFIX + kid + "".join(secrets.choice(ALPHABET) for _ in range(SECRET_LEN))).encode()
    forged = (body + checksum(body)).decode()
    assert len(forged) == len(real) and forged != real
    return forged


def readable(sock: socket.socket, wait: float) -> bool:
    return bool(select.select([sock], [], [], wait)[0])


def read_answer(sock: socket.socket, limit: float) -> bytes:
    """One response with a Content-Length (or whatever came before EOF or `limit`)."""
    deadline = time.monotonic() + limit
    data = b""
    while (left := deadline - time.monotonic()) > 0:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if length and len(rest) >= int(length.group(1)):
                return data
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            return data
        if not chunk:
            return data
        data += chunk
    return data


def closed_by_peer(sock: socket.socket, limit: float) -> bool:
    """Whether the other side closes the connection (FIN or RST) within `limit` seconds;
    anything still arriving meanwhile is read and dropped."""
    deadline = time.monotonic() + limit
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except OSError:  # reset
            return True
    return False


def normalised(raw_headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Header names as a lenient server reads them: lower case, `_` taken for `-`."""
    return [
        (n.decode("latin-1").lower().replace("_", "-"), v.decode("latin-1")) for n, v in raw_headers
    ]


# --- 1. methods ------------------------------------------------------------------------------


def test_trace_connect_and_unknown_methods_get_405_before_redis_and_upstream(
    edge: EdgeProcess, upstream: FakeUpstream, redis_server: RedisServer, make_key: MakeKey
) -> None:
    key, _ = make_key("pro")
    probes = {
        method: request_head(
            edge.port,
            key,
            f"{method} /v1/models HTTP/1.1",
            "x-fake-echo: 1",  # the upstream echoes what it gets, as Apache answers TRACE
            "Connection: close",
        )
        for method in ("TRACE", "CONNECT", "PROPFIND")
    }
    with CommandCounter(redis_server.port) as redis_calls:
        answers = {
            method: exchange(edge.port, probe, limit=3)[0] for method, probe in probes.items()
        }
    for method, data in answers.items():
        assert PROVIDER_KEY.encode() not in data, f"{method} echoed the provider key: {data!r}"
    for method, data in answers.items():
        assert data, f"{method}: no answer within 3 s"
        answer = parse_response(data)
        assert_edge_error(answer, 405, "method_not_allowed")
        allow = [m.strip() for m in (answer.header("allow") or "").split(",")]
        assert allow == ALLOWED, (method, answer.headers)
    assert redis_calls.commands == [], redis_calls.commands
    assert upstream.records == [], [(rec.method, rec.path) for rec in upstream.records]
    # the allowed methods still pass
    get = request_head(edge.port, key, "GET /v1/models HTTP/1.1", "Connection: close")
    assert parse_response(exchange(edge.port, get)[0]).status == 200


# --- 2. duplicate "model" keys ---------------------------------------------------------------

DUPLICATE_MODELS = [
    b'{"model":"gpt-4o-mini","MODEL":"gpt-4o"}',
    b'{"Model":"gpt-4o","model":"gpt-4o-mini"}',
    b'{"model":"gpt-4o","model":"gpt-4o-mini"}',
    b'{"mod\\u0065l":"gpt-4o","model":"gpt-4o-mini"}',
]


def test_duplicate_model_keys_are_refused_for_model_scoped_keys(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey, r: redis.Redis
) -> None:
    key, kid = scoped_key(make_key, r, models=["gpt-4o-mini", "long-*"])
    go = {"x-fake-go-json": "1"}  # the upstream reads `model` as Go's encoding/json does
    plain = post_json(edge, key, b'{"model": "gpt-4o-mini", "input": "hi"}', **go)
    assert plain.status_code == 200, plain.text
    assert plain.json()["model"] == "gpt-4o-mini"
    upstream.clear()
    requests_before = r.hget(record_key(kid), "requests")

    for body in DUPLICATE_MODELS:
        resp = post_json(edge, key, body, **go)
        ran = resp.json().get("model") if resp.status_code == 200 else None
        assert resp.status_code == 400, (
            f"{body!r} was forwarded ({resp.status_code}) for a key scoped to gpt-4o-mini; "
            f"a Go upstream ran {ran!r}"
        )
        error = resp.json()["error"]
        assert (error["type"], error["code"], error["param"]) == (
            "invalid_request_error",
            "invalid_body",
            "model",
        ), error
    too_long = post_json(edge, key, b'{"model": "long-' + b"x" * 300 + b'"}', **go)
    assert too_long.status_code == 400, too_long.text
    error = too_long.json()["error"]
    assert (error["code"], error["param"]) == ("model_too_long", "model"), error
    assert upstream.records == []
    assert r.hget(record_key(kid), "requests") == requests_before  # nothing charged

    # one "model" still passes; a key without model scopes has its bodies forwarded untouched
    assert post_json(edge, key, b'{"model":"gpt-4o-mini"}', **go).status_code == 200
    unscoped, _ = make_key("pro")
    for body in DUPLICATE_MODELS:
        assert post_json(edge, unscoped, body).status_code == 200
    assert [rec.body for rec in upstream.records[1:]] == DUPLICATE_MODELS


# --- 3. trailers -----------------------------------------------------------------------------


def chunked_post(port: int, key: str | None, trailers: list[bytes], *lines: str) -> bytes:
    """A chunked POST of a small JSON body, its trailer section holding `trailers`."""
    head = request_head(
        port,
        key,
        "POST /v1/responses HTTP/1.1",
        "Content-Type: application/json",
        "Transfer-Encoding: chunked",
        "Connection: close",
        *lines,
    )
    body = chunked([b'{"input": "hi"}']).removesuffix(b"\r\n")  # up to the last chunk's line
    return head + body + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"


def test_trailer_fields_never_become_request_headers(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key("pro")
    trailers = [
        b"X-Real-IP: " + SPOOF_IP.encode(),
        b"X-Forwarded-For: 6.6.6.6",
        b"X-Trailer-Test: 1",
    ]
    data, _ = exchange(edge.port, chunked_post(edge.port, key, trailers, "Trailer: X-Trailer-Test"))
    assert parse_response(data).status == 200, data[:300]
    [record] = upstream.records
    seen = normalised(record.raw_headers)
    assert "x-trailer-test" not in {n for n, _ in seen}, record.raw_headers
    assert [v for n, v in seen if n == "x-real-ip"] == []
    assert [v for n, v in seen if n == "x-forwarded-for"] == ["127.0.0.1"]
    assert all(SPOOF_IP not in v for _, v in seen), record.raw_headers
    assert record.body == b'{"input": "hi"}'

    upstream.clear()
    in_trailer_only = chunked_post(edge.port, None, [f"Authorization: Bearer {key}".encode()])
    data, _ = exchange(edge.port, in_trailer_only)
    answer = parse_response(data)
    assert answer.status == 401, f"a key sent only as a trailer was accepted: {data[:300]!r}"
    assert upstream.records == []


def test_trailer_fields_count_against_the_header_limits(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key("pro")
    many = [b"X-T%d: v" % i for i in range(200)]
    big = [b"X-Big-Trailer: " + b"b" * 100_000]
    for name, trailers in (("200 trailer fields", many), ("a 100 KB trailer", big)):
        data, closed = exchange(edge.port, chunked_post(edge.port, key, trailers), limit=5)
        assert closed, f"{name}: connection still open"
        if data:  # no response had started: edge's 431
            assert_edge_error(parse_response(data), 431, "request_header_fields_too_large")
        assert upstream.records == [], f"{name} forwarded: {[r.method for r in upstream.records]}"


# --- 4. nothing held before admission --------------------------------------------------------


@pytest.mark.slow
def test_trailers_of_a_keyless_request_are_never_read(
    spawn_edge: Spawn, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    """No key: answered 401 at once with `connection: close`, and the 8 MB of trailer fields
    that follow are not buffered (today: RSS grew by over 100 MB)."""
    proc = spawn_edge(edge_env(redis_server.url, upstream.url), name="keyless")
    head = request_head(
        proc.port, None, "POST /v1/responses HTTP/1.1", "Transfer-Encoding: chunked"
    )
    warm_up, _ = exchange(proc.port, head + chunked([b"{}"]))  # a first 401, before measuring
    assert parse_response(warm_up).status == 401
    before = reset_peak_rss(proc.pid)
    sent, refused = 0, False
    with socket.create_connection(("127.0.0.1", proc.port), timeout=5) as sock:
        sock.sendall(head + b"2\r\n{}\r\n0\r\n")  # the last chunk: trailer fields follow
        answer = parse_response(read_answer(sock, 3))
        piece = b"".join(b"T%06d: %06d\r\n" % (i, i) for i in range(4096))  # 64 KB, 4096 fields
        try:
            while sent < 8 * MB:
                sock.sendall(piece)
                sent += len(piece)
            sock.sendall(b"\r\n")
        except OSError:  # broken pipe or reset: edge closed the connection
            refused = True
        time.sleep(0.3)  # let edge parse what the socket buffers still hold
        closed = refused or closed_by_peer(sock, 2)
        grew = peak_rss(proc.pid) - before
    assert grew < 10 * MB, (
        f"edge's RSS grew by {grew / MB:.0f} MB on {sent / MB:.1f} MB of trailers"
    )
    assert answer.status == 401, answer.raw[:300]
    assert json_error(answer)["code"] == "invalid_api_key"
    assert answer.header("connection") == "close", answer.headers
    assert closed, "the connection stayed open after the 401"
    assert upstream.records == []


@dataclass
class Upload:
    sent_at_answer: int | None  # body bytes sent when the answer arrived (None: not until all)
    answer: RawResponse | None
    closed: bool


BODY_SIZE = 30 * MB
PIECE = 64 * 1024
TRICKLE_BYTES = 2 * MB  # trickled at 64 KB per 50 ms, waiting for an answer; then the rest at once


def trickled_upload(port: int, token: str) -> Upload:
    """POST a 30 MB body (Content-Length) with `token`, 64 KB every 50 ms, watching for an
    answer between pieces. If none comes within the first 2 MB, the rest goes at once (so a
    server that reads it all shows what that costs) and the answer is awaited after."""
    head = request_head(
        port,
        token,
        "POST /v1/responses HTTP/1.1",
        "Content-Type: application/json",
        f"Content-Length: {BODY_SIZE}",
    )
    start = b'{"model": "gpt-4o-mini", "input": "'
    body = memoryview(start + b"x" * (BODY_SIZE - len(start) - 2) + b'"}')
    sent, sent_at_answer, data = 0, None, b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        try:
            while sent < TRICKLE_BYTES:
                if readable(sock, 0.05):
                    sent_at_answer = sent
                    break
                sock.sendall(body[sent : sent + PIECE])
                sent += PIECE
            else:
                sock.sendall(body[sent:])
                sent = BODY_SIZE
        except OSError:  # edge closed the connection: what it answered is still readable
            sent_at_answer = sent
        data = read_answer(sock, 10)
        closed = closed_by_peer(sock, 2)
    return Upload(sent_at_answer, parse_response(data) if data else None, closed)


@pytest.mark.slow
def test_forged_key_bodies_are_refused_before_they_are_read(
    spawn_edge: Spawn,
    upstream: FakeUpstream,
    redis_server: RedisServer,
    make_key: MakeKey,
    r: redis.Redis,
) -> None:
    """A forged token for a known model-scoped key id: today edge reads each 30 MB body to
    find its model before asking Redis whether the key exists."""
    proc = spawn_edge(edge_env(redis_server.url, upstream.url), name="forged")
    real, _ = scoped_key(make_key, r, models=["gpt-4o-mini"])
    # edge learns that this key id has model scopes
    assert post_json(proc, real, b'{"model": "gpt-4o-mini"}').status_code == 200
    forged = forged_key(real)
    before = reset_peak_rss(proc.pid)
    with CommandCounter(redis_server.port) as redis_calls:
        uploads = [trickled_upload(proc.port, forged) for _ in range(3)]
    grew = peak_rss(proc.pid) - before
    seen = [(u.sent_at_answer, u.answer and u.answer.status, u.closed) for u in uploads]
    facts = f"(body bytes sent when answered, status, closed): {seen}; peak RSS +{grew // MB} MB"
    for upload in uploads:
        assert upload.sent_at_answer is not None and upload.sent_at_answer < 10 * MB, (
            f"answered only after the body was sent: {facts}"
        )
        assert upload.answer is not None and upload.answer.status == 401, facts
        assert json_error(upload.answer)["code"] == "invalid_api_key"
        assert upload.answer.header("connection") == "close", facts
        assert upload.closed, facts
    assert grew < 10 * MB, facts
    assert redis_calls.commands.count("EVALSHA") <= 3, redis_calls.commands
    assert len(upstream.records) == 1  # the real key's request only


@pytest.mark.slow
def test_a_trickled_body_is_cut_by_the_body_timeout(
    spawn_edge: Spawn, upstream: FakeUpstream, redis_server: RedisServer, make_key: MakeKey
) -> None:
    """`server.body_timeout` (1 s here): a body that stalls longer between two pieces is cut,
    with a 408, instead of holding the connection (and its upstream request) open."""
    env = edge_env(redis_server.url, upstream.url, EDGE_SERVER_BODY_TIMEOUT="1")
    proc = spawn_edge(env, name="body-timeout")
    key, _ = make_key("pro")
    head = request_head(
        proc.port,
        key,
        "POST /v1/responses HTTP/1.1",
        "Content-Type: application/json",
        "Content-Length: 10",
    )
    with socket.create_connection(("127.0.0.1", proc.port), timeout=5) as sock:
        sock.sendall(head + b"{")  # the head and the first byte of the body
        last_byte = time.monotonic()
        for byte in (b'"', b"a", b'"'):  # then one byte every 2 s, while the connection lasts
            if readable(sock, 2):
                break
            try:
                sock.sendall(byte)
            except OSError:
                break
            last_byte = time.monotonic()
        data = read_answer(sock, 2.5)
        closed = closed_by_peer(sock, 2.5 - (time.monotonic() - last_byte))
        cut_after = time.monotonic() - last_byte
    assert closed, f"still open {cut_after:.1f} s after the last byte; got {data[:200]!r}"
    assert 0.9 <= cut_after <= 2.5, cut_after
    if data:  # no response had started: edge's 408
        assert_edge_error(parse_response(data), 408, "request_timeout")


# --- 5. pipelined heads ----------------------------------------------------------------------


def test_a_pipelined_head_is_held_to_max_header_bytes(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key("pro")
    pads = [f"X-Pad-{i}: " + "p" * 6_000 for i in range(10)]  # 60 KB, each field under 8 KB
    big = request_head(
        edge.port, key, "GET /v1/models?second=1 HTTP/1.1", "Connection: close", *pads
    )
    alone, _ = exchange(edge.port, big)
    assert_edge_error(parse_response(alone), 431, "request_header_fields_too_large")

    small = request_head(edge.port, key, "GET /v1/models HTTP/1.1")
    data, closed = exchange(edge.port, small + big, limit=3)
    answers = split_responses(data)
    assert [a.status for a in answers] == [200, 431], data[:600]
    assert_edge_error(answers[1], 431, "request_header_fields_too_large")
    assert closed
    assert [rec.query for rec in upstream.records] == [""], "the pipelined head was forwarded"


# --- 6. forwarding headers -------------------------------------------------------------------

SPOOFED = [
    ("X-Forwarded-Port", "6666"),
    ("X-Forwarded-Prefix", "/evil"),
    ("X-Forwarded-Server", SPOOF_HOST),
    ("X-Forwarded-Ssl", "on"),
    ("X-Forwarded-Scheme", "https"),
    ("X-Forwarded-Host", SPOOF_HOST),
    ("Forwarded", f"for={SPOOF_IP};host={SPOOF_HOST};proto=https"),
    ("X-Real-IP", SPOOF_IP),
    ("X-Forwarded-For", SPOOF_IP),
    ("X-Forwarded-Proto", "https"),
    ("X_Forwarded_For", SPOOF_IP),
    ("X-Real_IP", SPOOF_IP),
    ("x_forwarded_host", SPOOF_HOST),
    ("True-Client-IP", SPOOF_IP),
    ("X-Client-IP", SPOOF_IP),
    ("CF-Connecting-IP", SPOOF_IP),
]


def test_forwarding_headers_from_untrusted_clients_never_reach_the_upstream(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key("pro")
    lines = [f"Authorization: Bearer {key}".encode()]
    lines += [f"{name}: {value}".encode() for name, value in SPOOFED]
    assert raw_get(edge.port, lines).status == 200
    [record] = upstream.records
    seen = normalised(record.raw_headers)
    names = {n for n, _ in seen}
    leaked = {name.lower().replace("_", "-") for name, _ in SPOOFED} & names
    assert leaked <= {"x-forwarded-for", "x-forwarded-proto"}, record.raw_headers
    assert [v for n, v in seen if n == "x-forwarded-for"] == ["127.0.0.1"], record.raw_headers
    assert [v for n, v in seen if n == "x-forwarded-proto"] == ["http"], record.raw_headers
    for _, value in seen:
        assert SPOOF_IP not in value and SPOOF_HOST not in value, record.raw_headers


# --- 7. path tricks --------------------------------------------------------------------------

TRICK_PATHS = [
    "/v1/chat/completions/..;/files",
    "/v1/chat/completions/%252e%252e/files",
    "/v1/chat/completions/.;/x",
    "/v1/chat/completions/%2e%2e;x/files",
]


def test_semicolon_and_double_encoded_dot_segments_are_invalid_paths(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey, r: redis.Redis
) -> None:
    scoped, _ = scoped_key(make_key, r, routes=["chat/completions"])
    unscoped, _ = make_key("pro")
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
    for key in (scoped, unscoped):
        for path in TRICK_PATHS:
            request = request_head(
                edge.port,
                key,
                f"POST {path} HTTP/1.1",
                "Content-Type: application/json",
                f"Content-Length: {len(body)}",
                "Connection: close",
            )
            data, _ = exchange(edge.port, request + body)
            answer = parse_response(data)
            assert answer.status == 400, f"{path} → {answer.status}: {data[:300]!r}"
            assert_edge_error(answer, 400, "invalid_path")
    assert upstream.records == [], [rec.path for rec in upstream.records]
    ok = httpx.post(f"{edge.url}/v1/chat/completions", headers=auth(scoped), content=body)
    assert ok.status_code == 200


def test_nothing_pipelined_behind_a_refused_head_is_served(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    """[small GET][oversized head][another GET] in one write: the first is answered, then the
    431, and the request behind the refused one never runs."""
    key, _ = make_key("pro")
    pads = [f"X-Pad-{i}: " + "p" * 6_000 for i in range(10)]
    big = request_head(edge.port, key, "GET /v1/models?second=1 HTTP/1.1", *pads)
    small = request_head(edge.port, key, "GET /v1/models HTTP/1.1")
    after = request_head(edge.port, key, "GET /v1/models?third=1 HTTP/1.1")
    data, closed = exchange(edge.port, small + big + after, limit=3)
    assert [a.status for a in split_responses(data)] == [200, 431], data[:600]
    assert closed
    assert [rec.query for rec in upstream.records] == [""]
