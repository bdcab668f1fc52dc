"""settle.lua against a real redis-server: a metered request's usage charged once, exactly.

Token buckets go into debt and refill as admit.lua reads them; the credit cost carries the part
of a credit not yet charged from one settlement to the next, so the sum over many settlements
is the sum of their prices, never one off; a settlement sent twice (a retry after a timeout
that did run) charges once; garbage in the record never makes it fail after a first write.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio

from edge import keys
from edge.redis.scripts import Script
from tests.support.redis_server import RedisServer

KEY = "gw_sk_" + "s" * 44


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[Any]:
    yield redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def settle(
    client: Any, kid: str, tokens_in: int, tokens_out: int, cost: int, tpm: int = -1,
    tpd: int = -1, settlement: str | None = None,
) -> list[int]:  # fmt: skip
    script = Script("settle")
    ident = settlement or secrets.token_hex(8)
    reply = await script(
        client, keys.settle_keys(kid, ident), [tokens_in, tokens_out, cost, tpm, tpd, 60, 90]
    )
    return [int(v) for v in reply]


async def new_record(client: Any, **fields: str) -> str:
    kid = keys.new_kid()
    await client.hset(keys.record_key(kid), mapping={"hash": keys.key_hash(KEY), **fields})
    return kid


def test_a_settlement_sent_twice_charges_once(client: Any) -> None:
    async def go() -> None:
        kid = await new_record(client, credits="100")
        assert await settle(client, kid, 10, 5, 3_000_000, settlement="abc") == [1, 3, 97]
        again = await settle(client, kid, 10, 5, 3_000_000, settlement="abc")
        assert again == [0, 3]  # charges nothing, says what the first one charged
        record = await client.hgetall(keys.record_key(kid))
        assert (record["credits"], record["tokens"]) == ("97", "15")
        await client.aclose()

    run(go())


def test_fractions_of_a_credit_add_up_exactly(client: Any) -> None:
    async def go() -> None:
        kid = await new_record(client, credits="1000")
        charged = 0
        for _ in range(300):  # 333,333 micro-credits each: 99,999,900 in all
            charged += (await settle(client, kid, 1, 0, 333_333))[1]
        record = await client.hgetall(keys.record_key(kid))
        assert charged == 99 and record["credits"] == "901"
        assert record["credit_micros"] == "999900"
        await client.aclose()

    run(go())


def test_token_buckets_go_into_debt_and_an_unlimited_key_pays_no_credits(client: Any) -> None:
    async def go() -> None:
        kid = await new_record(client)  # no credits field: unlimited
        assert await settle(client, kid, 300, 200, 9_000_000, tpm=100, tpd=10_000) == [1, 0, 0]
        minute = await client.hgetall(keys.record_key(kid) + ":tm")
        day = await client.hgetall(keys.record_key(kid) + ":td")
        assert float(minute["tokens"]) == pytest.approx(-400, abs=5)  # 100 - 500, a hair refilled
        assert float(day["tokens"]) == pytest.approx(9_500, abs=1)
        assert 0 < await client.pttl(keys.record_key(kid) + ":tm") <= 5 * 60_000 + 1_000
        record = await client.hgetall(keys.record_key(kid))
        assert "credits" not in record and record["tokens"] == "500"
        await client.aclose()

    run(go())


def test_a_balance_may_go_below_zero(client: Any) -> None:
    async def go() -> None:
        kid = await new_record(client, credits="2")
        assert await settle(client, kid, 5, 5, 7_500_000) == [1, 7, -5]
        await client.aclose()

    run(go())


@pytest.mark.parametrize(
    "fields",
    [
        {"credits": "abc", "tokens": "x", "credit_micros": "-5"},
        {"credits": "9" * 20, "tokens": "1e309"},
        {"credits": "", "credit_micros": "9999999"},
    ],
)
def test_garbage_in_the_record_never_fails_a_settlement(
    client: Any, fields: dict[str, str]
) -> None:
    async def go() -> None:
        kid = await new_record(client, **fields)
        await client.hset(keys.record_key(kid) + ":tm", mapping={"tokens": "nan", "ts": "x"})
        reply = await settle(client, kid, 3, 4, 2_000_000, tpm=50)
        assert reply[0] == 1
        record = await client.hgetall(keys.record_key(kid))
        assert record["tokens"] == "7"
        await client.aclose()

    run(go())


def test_a_key_that_is_gone_is_not_recreated(client: Any) -> None:
    async def go() -> None:
        kid = keys.new_kid()
        assert await settle(client, kid, 1, 1, 1_000_000) == [1, 0, 0]
        assert await client.exists(keys.record_key(kid)) == 0
        await client.aclose()

    run(go())
