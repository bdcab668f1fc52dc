"""Scopes and credits, enforced by admit.lua in its one round trip, through real edge processes.

Scopes `{"routes": [...], "models": [...]}` on a key: outside them → 403, nothing reaches the
upstream and nothing is charged. Only keys with model scopes have their body read (to find its
`model`); it is still forwarded byte for byte. Credits: absent = unlimited; at 0 → 402 with
nothing charged; a top-up of N admits exactly N more across instances; a request the upstream
never received gets its credit back.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable

import httpx
import pytest
import redis

from edge.control.records import KeyRecord
from edge.keys import bucket_keys, record_key
from tests.support.edge_process import EdgeProcess, auth, edge_env
from tests.support.fake_upstream import FakeUpstream
from tests.support.metrics import scrape, value
from tests.support.monitor import CommandCounter
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer

MakeKey = Callable[..., tuple[str, KeyRecord]]
CHAT = "/v1/responses"  # the fake upstream echoes it: bodies need not be valid requests


def scoped_key(make_key: MakeKey, r: redis.Redis, **scopes: list[str]) -> tuple[str, str]:
    key, rec = make_key("pro")
    r.hset(record_key(rec.id), "scopes", json.dumps(scopes))
    return key, rec.id


def post(url: str, key: str, body: bytes, path: str = CHAT) -> httpx.Response:
    headers = auth(key, **{"Content-Type": "application/json"})
    return httpx.post(url + path, headers=headers, content=body, timeout=10)


def assert_error(resp: httpx.Response, status: int, type_: str, code: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert (error["type"], error["code"]) == (type_, code)


def test_route_scopes(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey, r: redis.Redis
) -> None:
    key, kid = scoped_key(make_key, r, routes=["embeddings", "models"])
    forbidden = {"plan": "pro", "outcome": "forbidden"}
    before = value(scrape(edge.url), "edge_requests_total", **forbidden)
    with httpx.Client(base_url=edge.url, headers=auth(key), timeout=10) as client:
        for path in ("/v1/chat/completions", "/v1/files", "/v1/embeddingsX", "/v1/modelsx/a"):
            assert_error(client.post(path), 403, "permission_error", "insufficient_permissions")
        assert upstream.records == []
        assert r.exists(*bucket_keys(kid)) == 0  # nothing charged
        assert value(scrape(edge.url), "edge_requests_total", **forbidden) == before + 4
        assert client.get("/v1/models").status_code == 200
        assert client.get("/v1/models/gpt-4o").status_code == 200
        assert client.post("/v1/embeddings", json={"input": "x"}).status_code == 200
    assert [rec.path for rec in upstream.records] == [
        "/v1/models",
        "/v1/models/gpt-4o",
        "/v1/embeddings",
    ]


def test_model_scopes_read_the_body_and_forward_it_byte_for_byte(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey, r: redis.Redis
) -> None:
    key, kid = scoped_key(make_key, r, models=["gpt-4o*", "o?-mini"])
    allowed = b'{ "messages":[{"role":"user","content":"hi"}] ,\n "model" : "gpt-4o-mini"  }'
    assert post(edge.url, key, allowed).status_code == 200
    assert (
        post(edge.url, key, b'{"model": "o3-mini", "messages": [{"role": "user"}]}').status_code
        == 200
    )
    [first, second] = upstream.records
    assert first.body == allowed  # read to find the model, forwarded untouched
    assert second.body == b'{"model": "o3-mini", "messages": [{"role": "user"}]}'

    upstream.clear()
    outside = post(edge.url, key, b'{"model": "gpt-3.5-turbo", "messages": []}')
    assert_error(outside, 403, "permission_error", "insufficient_permissions")
    for unusable in (b'{"model": ', b"[]", b'{"messages": []}', b'{"model": 5}', b""):
        resp = post(edge.url, key, unusable)
        assert_error(resp, 400, "invalid_request_error", "invalid_body")
        assert resp.json()["error"]["param"] == "model"
    assert upstream.records == []
    minute, _ = bucket_keys(kid)
    assert float(r.hget(minute, "tokens")) >= 197.9  # only the two admitted were charged
    # a request without a body carries no model: model scopes have nothing to refuse
    assert httpx.get(f"{edge.url}/v1/models", headers=auth(key)).status_code == 200
    assert httpx.delete(f"{edge.url}/v1/files/f-1", headers=auth(key)).status_code == 200


def test_model_scoped_body_streamed_in_many_pieces(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey, r: redis.Redis
) -> None:
    key, _ = scoped_key(make_key, r, models=["m-*"])
    body = b'{"model": "m-1", "pad": "' + b"x" * 300_000 + b'"}'

    def pieces() -> list[bytes]:
        return [body[i : i + 65_536] for i in range(0, len(body), 65_536)]

    headers = auth(key, **{"Content-Type": "application/json"})
    resp = httpx.post(edge.url + CHAT, headers=headers, content=iter(pieces()), timeout=10)
    assert resp.status_code == 200
    [record] = upstream.records
    assert record.body_length == len(body)


def test_keys_without_scopes_never_parse_bodies(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key()
    for body in (b'{"model": ', b"\x00\xff binary", b""):
        assert post(edge.url, key, body, "/v1/files").status_code == 200
    assert [rec.body for rec in upstream.records] == [b'{"model": ', b"\x00\xff binary", b""]


def test_one_round_trip_once_a_model_scoped_key_is_known(
    edge: EdgeProcess, redis_server: RedisServer, make_key: MakeKey, r: redis.Redis
) -> None:
    """The first request of a key with model scopes asks twice (the script says it needs the
    model, charging nothing); after that edge reads such a key's body up front: one command."""
    key, _ = scoped_key(make_key, r, models=["gpt-*"])
    body = b'{"model": "gpt-x"}'
    with CommandCounter(redis_server.port) as first:
        assert post(edge.url, key, body).status_code == 200
    with CommandCounter(redis_server.port) as later:
        for _ in range(3):
            assert post(edge.url, key, body).status_code == 200
    assert first.commands == ["EVALSHA", "EVALSHA"]
    assert later.commands == ["EVALSHA"] * 3

    unscoped = make_key()[0]
    with CommandCounter(redis_server.port) as plain:
        assert post(edge.url, unscoped, body).status_code == 200
    assert plain.commands == ["EVALSHA"]


def test_unreadable_scopes_deny_everything(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey, r: redis.Redis
) -> None:
    key, rec = make_key()
    for garbage in ("{not json", "null", "5"):
        r.hset(record_key(rec.id), "scopes", garbage)
        resp = httpx.get(f"{edge.url}/v1/models", headers=auth(key))
        assert_error(resp, 403, "permission_error", "insufficient_permissions")
    r.hset(record_key(rec.id), "scopes", "{}")  # no restriction at all
    assert httpx.get(f"{edge.url}/v1/models", headers=auth(key)).status_code == 200
    assert len(upstream.records) == 1


def test_credits_run_out_with_402_and_nothing_charged(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey, r: redis.Redis
) -> None:
    key, rec = make_key("team")
    r.hset(record_key(rec.id), "credits", 3)
    before = scrape(edge.url)
    with httpx.Client(base_url=edge.url, headers=auth(key), timeout=10) as client:
        assert [client.get("/v1/models").status_code for _ in range(3)] == [200] * 3
        minute, _ = bucket_keys(rec.id)
        tokens = float(r.hget(minute, "tokens"))
        for _ in range(2):
            assert_error(
                client.get("/v1/models"), 402, "insufficient_balance", "insufficient_balance"
            )
    assert float(r.hget(minute, "tokens")) >= tokens  # 402s charged no token
    assert r.hget(record_key(rec.id), "credits") == b"0"
    assert len(upstream.records) == 3
    after = scrape(edge.url)
    labels = {"plan": "team", "outcome": "insufficient_balance"}
    grew = value(after, "edge_requests_total", **labels) - value(
        before, "edge_requests_total", **labels
    )
    assert grew == 2

    r.hset(record_key(rec.id), "credits", "garbage")  # unreadable balance: none left
    assert httpx.get(f"{edge.url}/v1/models", headers=auth(key)).status_code == 402
    r.hdel(record_key(rec.id), "credits")  # absent: unlimited again
    assert httpx.get(f"{edge.url}/v1/models", headers=auth(key)).status_code == 200


@pytest.mark.multiproc
async def test_a_top_up_admits_exactly_that_many_across_two_instances(
    edge: EdgeProcess,
    spawn_edge: Callable[..., EdgeProcess],
    redis_server: RedisServer,
    upstream: FakeUpstream,
    make_key: MakeKey,
    r: redis.Redis,
) -> None:
    other = spawn_edge(edge_env(redis_server.url, upstream.url), name="second")
    key, rec = make_key("team")
    r.hset(record_key(rec.id), "credits", 0)
    r.hincrby(record_key(rec.id), "credits", 7)  # the top-up
    async with httpx.AsyncClient(headers=auth(key), timeout=20) as client:
        urls = [edge.url, other.url] * 25
        statuses = await asyncio.gather(*(client.get(f"{u}/v1/models") for u in urls))
    assert Counter(s.status_code for s in statuses) == {200: 7, 402: 43}
    assert len(upstream.records) == 7
    assert r.hget(record_key(rec.id), "credits") == b"0"


def test_a_request_the_upstream_never_received_gets_its_credit_back(
    spawn_edge: Callable[..., EdgeProcess],
    redis_server: RedisServer,
    make_key: MakeKey,
    r: redis.Redis,
) -> None:
    closed = spawn_edge(edge_env(redis_server.url, f"http://127.0.0.1:{free_port()}/v1"))
    key, rec = make_key()
    r.hset(record_key(rec.id), "credits", 2)
    resp = httpx.get(f"{closed.url}/v1/models", headers=auth(key), timeout=10)
    assert resp.status_code == 502
    assert r.hget(record_key(rec.id), "credits") == b"2"  # refunded
    assert r.hget(record_key(rec.id), "requests") == b"1"  # but it was admitted (and counted)
