"""Metering through real edge processes: LLM-token limits and credits priced by tokens.

Against a real redis-server, the fake upstream (edge's demo handlers: usage reported as OpenAI
reports it, tokens counted as words) and a raw-socket upstream playing other providers:

- token limits: a key with `tpm` is admitted while its minute token bucket is above zero and
  charged after the answer (the bucket goes into debt), then refused with 429
  `rate_limit_exceeded` "on tokens per min (TPM)", `Retry-After`, outcome
  `rate_limited_tokens_minute`; `tpd` likewise ("per day (TPD)", `x-should-retry: false`);
  every answer of a key with `tpm` carries the token headers and `ratelimit-policy` windows;
- credits priced by tokens: a request costs `pricing.request` at admission (given back when
  nothing was sent) and its tokens' price at settlement, exactly: the part of a credit not
  yet charged is carried in `credit_micros`, across two instances and concurrent requests; a
  balance runs below zero by what was in flight, then 402 until topped up (admin API, CLI);
- the price comes from the request body's `model` however the body arrives (large, or in
  several writes), and a body naming two models is not priced as the cheaper;
- streams: edge asks the upstream for usage on a metered key's Chat Completions (and
  Completions) stream, hides the usage-only chunk from a client that did not ask (the
  official SDK indexes `choices[0]` on every chunk) and charges what it reported; a client
  that asked gets its usage chunk; `stream_usage = "client"` never touches the body;
- other providers' answers are read all the same: `"usage" : {` with spaces, a usage chunk in
  two pieces, running usage on every chunk (the last report counts), a gzip-compressed JSON
  answer, `usage` before a large `data`;
- the Responses API (plain and streamed) and Embeddings are metered from the usage reported;
- answers without usage, streams cut mid-way and clients that leave (mid-stream or before
  the answer) are charged an estimate (`ceil(bytes / 4)` each way); an upstream error status
  charges no tokens;
- unmetered keys still cost one Redis command per request, metered ones at most two;
- a settlement that cannot be written is counted (`edge_settlement_failures_total`) without
  delaying the answer; one retried after a timeout is charged once, and counted;
- metrics (`edge_tokens_total`, `edge_credits_charged_total`) move by what was charged, and
  the admin API and CLI show and change the pricing, plans and per-key token limits.

Settlement runs in the background right after each answer: tests poll Redis for its result
(`wait_until`), never sleep to a boundary; token buckets are seeded with HSET (Redis-time ms)
to put them into debt deterministically.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import httpx
import pytest
import redis
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from edge.control.records import KeyRecord
from edge.keys import record_key
from tests.support.edge_process import EdgeProcess, auth, edge_env, run_cli
from tests.support.fake_upstream import FakeUpstream
from tests.support.keys import new_key
from tests.support.metrics import Samples, scrape, value
from tests.support.monitor import CommandCounter
from tests.support.ports import free_port
from tests.support.raw_upstream import Raw, RawUpstream
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

MakeKey = Callable[..., tuple[str, KeyRecord]]
SpawnEdge = Callable[..., EdgeProcess]

ADMIN_TOKEN = f"metering-admin-{secrets.token_hex(12)}"
PRICES: list[dict[str, Any]] = [
    {"match": "unit-*", "input": 1_000_000, "output": 2_000_000},  # 1 and 2 credits a token
    {"match": "frac-?", "input": 333_333, "output": 777_777, "cached_input": 111_111},
    {"match": "tiny-*", "input": 3, "output": 3},
]
TEAM_TPM, TEAM_TPD = 900_000, 90_000_000  # the team plan's token limits (pro has none)
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "how many tokens is this"}
]
INCLUDE_USAGE = b'"stream_options":{"include_usage":true}'
SETTLED = 5.0  # seconds a background settlement may take to show in Redis


# Configuration and processes.


def priced_env(redis_url: str, upstream_url: str, **extra: str) -> dict[str, str]:
    """edge with the test prices, token limits on the team plan and the admin API on."""
    return edge_env(
        redis_url,
        upstream_url,
        EDGE_PRICING_MODELS=json.dumps(PRICES),
        EDGE_PLANS_TEAM_TPM=str(TEAM_TPM),
        EDGE_PLANS_TEAM_TPD=str(TEAM_TPD),
        EDGE_ADMIN_TOKEN=ADMIN_TOKEN,
        EDGE_LOG_LEVEL="info",
        **extra,
    )


class Pair(NamedTuple):
    a: EdgeProcess
    b: EdgeProcess


@pytest.fixture(scope="module")
def priced(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    fake_upstream_server: FakeUpstream,
) -> Iterator[Pair]:
    """Two priced edge processes on the session Redis, in front of the fake upstream."""
    log_dir = tmp_path_factory.mktemp("metering")
    env = priced_env(redis_server.url, fake_upstream_server.url)
    procs: list[EdgeProcess] = []
    try:
        for name in ("priced-a", "priced-b"):
            procs.append(EdgeProcess(log_dir, env, name).start())
        yield Pair(*procs)
    finally:
        for proc in procs:
            proc.stop()


# What a key has been charged.


class Ledger(NamedTuple):
    credits: int | None  # None: unlimited
    micros: int  # the part of a credit not charged yet
    tokens: int  # LLM tokens settled


def ledger(r: redis.Redis, kid: str) -> Ledger:
    raw: dict[bytes, bytes] = r.hgetall(record_key(kid))  # type: ignore[assignment]
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    credits = fields.get("credits")
    return Ledger(
        int(credits) if credits else None,
        int(fields.get("credit_micros", "0")),
        int(fields.get("tokens", "0")),
    )


def settled(r: redis.Redis, kid: str, tokens: int) -> Ledger:
    """The key's ledger once its settled token count reaches `tokens` (fails if it never
    does, or passes it)."""
    assert wait_until(lambda: ledger(r, kid).tokens >= tokens, SETTLED), ledger(r, kid)
    now = ledger(r, kid)
    assert now.tokens == tokens, now
    return now


def cost_micros(model_price: dict[str, Any], p: int, c: int, cached: int = 0) -> int:
    """What a usage costs at a price, in millionths of a credit: (p - cached) * input +
    cached * cached_input + c * output, prices being per million tokens."""
    price_in: int = model_price["input"]
    price_out: int = model_price["output"]
    price_cached: int = model_price.get("cached_input", price_in)
    return (p - cached) * price_in + cached * price_cached + c * price_out


UNIT, FRAC, TINY = PRICES


def unit_cost(p: int, c: int) -> int:
    """A request at the unit prices, the request price included: 1 + p + 2c credits."""
    assert cost_micros(UNIT, p, c) == (p + 2 * c) * 10**6
    return 1 + p + 2 * c


def estimate(n: int) -> int:
    return math.ceil(n / 4)


def estimate_pair(request: bytes, answer: bytes) -> tuple[int, int]:
    """The estimate of an answer without usage: ceil(bytes / 4) each way."""
    return estimate(len(request)), estimate(len(answer))


def key_tokens_bucket(kid: str, window: str = "tm") -> str:
    return f"{record_key(kid)}:{window}"


def redis_ms(r: redis.Redis) -> int:
    sec, usec = r.time()
    return int(sec) * 1000 + int(usec) // 1000


def seed_debt(r: redis.Redis, kid: str, window: str, tokens: float) -> None:
    """Put a token bucket at `tokens` (below zero: in debt), as of Redis now."""
    bucket = key_tokens_bucket(kid, window)
    r.hset(bucket, mapping={"tokens": tokens, "ts": redis_ms(r)})
    r.pexpire(bucket, 3_600_000)


# Requests.


def chat(model: str, stream: bool = False, **extra: Any) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": MESSAGES, **extra}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def post(
    url: str, key: str, body: bytes, path: str = "/v1/chat/completions", **knobs: str
) -> httpx.Response:
    headers = auth(key, **{"Content-Type": "application/json", **knobs})
    return httpx.post(url + path, headers=headers, content=body, timeout=10)


def sse_events(body: bytes) -> list[dict[str, Any]]:
    """The JSON events of an SSE body (`data: [DONE]` left out)."""
    out = []
    for event in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
        data = b"\n".join(lines)
        if data and data != b"[DONE]":
            out.append(json.loads(data))
    return out


def usage_of(usage: dict[str, Any]) -> tuple[int, int]:
    """(input, output) tokens of a usage object in any API's shape."""
    if "input_tokens" in usage:
        return usage["input_tokens"], usage["output_tokens"]
    return usage["prompt_tokens"], usage.get("completion_tokens", 0)


def metric_delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def token_deltas(before: Samples, after: Samples, plan: str) -> dict[tuple[str, str], float]:
    return {
        (direction, source): metric_delta(
            before, after, "edge_tokens_total", plan=plan, direction=direction, source=source
        )
        for direction in ("input", "output")
        for source in ("reported", "estimated")
    }


def sdk(url: str, key: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=10)


def admin(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers=auth(ADMIN_TOKEN), timeout=10)


# Credits priced by tokens.


def test_a_chat_answer_costs_the_request_price_plus_its_tokens(
    priced: Pair, upstream: FakeUpstream, make_key: MakeKey, r: redis.Redis
) -> None:
    key, rec = make_key("pro", credits=10_000)
    before = scrape(priced.a.url)
    resp = post(priced.a.url, key, chat("unit-1"))
    assert resp.status_code == 200, resp.text
    p, c = usage_of(resp.json()["usage"])
    assert p > 0 and c > 0
    assert upstream.records[0].body == chat("unit-1")  # not a stream: the body is untouched
    now = settled(r, rec.id, p + c)
    assert now == Ledger(10_000 - unit_cost(p, c), 0, p + c)
    after = scrape(priced.a.url)
    assert token_deltas(before, after, "pro") == {
        ("input", "reported"): p,
        ("output", "reported"): c,
        ("input", "estimated"): 0,
        ("output", "estimated"): 0,
    }
    assert metric_delta(before, after, "edge_credits_charged_total", plan="pro") == p + 2 * c


async def one_priced_request(client: httpx.AsyncClient, url: str, i: int) -> tuple[int, int]:
    """A chat completion (plain, or streamed with include_usage) or an embedding; the usage
    its answer reported to the client."""
    kind = i % 3
    if kind == 2:
        resp = await client.post(f"{url}/v1/embeddings", json={"model": "unit-e", "input": "a b"})
        assert resp.status_code == 200, resp.text
        return usage_of(resp.json()["usage"])
    opts = {"stream_options": {"include_usage": True}} if kind == 1 else {}
    body = chat("unit-c", stream=kind == 1, **opts)
    resp = await client.post(f"{url}/v1/chat/completions", content=body)
    assert resp.status_code == 200, resp.text
    if kind == 0:
        return usage_of(resp.json()["usage"])
    *chunks, last = sse_events(resp.content)
    assert last["choices"] == [] and all(chunk["choices"] for chunk in chunks)
    return usage_of(last["usage"])


@pytest.mark.multiproc
async def test_concurrent_requests_on_two_instances_are_charged_exactly(
    priced: Pair, make_key: MakeKey, r: redis.Redis
) -> None:
    """40 concurrent metered requests over two instances: the balance falls by exactly the
    sum of each answer's price (1 + p + 2c), and the key's token count by their tokens."""
    key, rec = make_key("pro", credits=1_000_000)
    before = [scrape(proc.url) for proc in priced]
    headers = auth(key, **{"Content-Type": "application/json"})
    async with httpx.AsyncClient(headers=headers, timeout=20) as client:
        usages = await asyncio.gather(
            *(one_priced_request(client, priced[i % 2].url, i) for i in range(40))
        )
    tokens = sum(p + c for p, c in usages)
    now = settled(r, rec.id, tokens)
    assert now == Ledger(1_000_000 - sum(unit_cost(p, c) for p, c in usages), 0, tokens)
    after = [scrape(proc.url) for proc in priced]
    charged = sum(
        metric_delta(b, a, "edge_credits_charged_total", plan="pro")
        for b, a in zip(before, after, strict=True)
    )
    assert charged == sum(p + 2 * c for p, c in usages)  # the request price is not in it
    for direction, index in (("input", 0), ("output", 1)):
        counted = sum(
            metric_delta(
                b, a, "edge_tokens_total", plan="pro", direction=direction, source="reported"
            )
            for b, a in zip(before, after, strict=True)
        )
        assert counted == sum(u[index] for u in usages)


def test_fractions_of_a_credit_are_carried_never_lost_or_doubled(
    priced: Pair, make_key: MakeKey, r: redis.Redis
) -> None:
    """Prices that are not whole credits: over many requests the balance falls by the request
    prices plus floor(total micro-credits / 10^6), and `credit_micros` holds the rest."""
    key, rec = make_key("pro", credits=100_000)
    costs: list[int] = []
    tokens = 0
    with httpx.Client(base_url=priced.a.url, headers=auth(key), timeout=10) as client:
        for i in range(12):
            text = " ".join(["word"] * (i * 7 + 1))
            resp = client.post(
                "/v1/chat/completions",
                json={"model": "frac-1", "messages": [{"role": "user", "content": text}]},
            )
            assert resp.status_code == 200, resp.text
            p, c = usage_of(resp.json()["usage"])
            costs.append(cost_micros(FRAC, p, c))
            tokens += p + c
    total = sum(costs)
    # rounding each request down, or up, would each be off: only carrying is exact
    assert sum(cost // 10**6 for cost in costs) < total // 10**6
    assert total // 10**6 < sum(-(-cost // 10**6) for cost in costs)
    now = settled(r, rec.id, tokens)
    assert now == Ledger(100_000 - 12 - total // 10**6, total % 10**6, tokens)


def test_tiny_prices_add_up_to_a_credit_exactly_when_the_sum_crosses_one(
    priced: Pair, make_key: MakeKey, r: redis.Redis
) -> None:
    """At 3 credits per million tokens no single request costs a credit; what is owed carries
    over, and exactly when the running total crosses a whole credit, one is charged."""
    key, rec = make_key("pro", credits=1_000)
    r.hset(record_key(rec.id), "credit_micros", 999_000)  # a thousandth of a credit short
    usages = []
    with httpx.Client(base_url=priced.a.url, headers=auth(key), timeout=10) as client:
        for _ in range(15):
            resp = client.post("/v1/chat/completions", content=chat("tiny-1"))
            assert resp.status_code == 200, resp.text
            usages.append(usage_of(resp.json()["usage"]))
            settled(r, rec.id, sum(p + c for p, c in usages))
    total = 999_000 + sum(cost_micros(TINY, p, c) for p, c in usages)
    assert 10**6 <= total < 2 * 10**6  # the sum crossed one credit, once
    assert ledger(r, rec.id) == Ledger(1_000 - 15 - 1, total - 10**6, sum(p + c for p, c in usages))


def test_a_balance_goes_below_zero_by_what_was_in_flight_then_402_until_topped_up(
    priced: Pair, redis_server: RedisServer, make_key: MakeKey, r: redis.Redis
) -> None:
    """A balance of 3 admits a request that costs more: the balance shows the debt, the key
    gets 402 until a top-up (admin API, then CLI) takes the balance above zero."""
    key, rec = make_key("pro", credits=3)
    resp = post(priced.a.url, key, chat("unit-1"))
    assert resp.status_code == 200, resp.text
    p, c = usage_of(resp.json()["usage"])
    debt = 3 - unit_cost(p, c)
    assert debt < 0
    assert settled(r, rec.id, p + c).credits == debt
    refused = post(priced.a.url, key, chat("unit-1"))
    assert refused.status_code == 402
    assert refused.json()["error"]["code"] == "insufficient_balance"
    with admin(priced.a.url) as api:
        shown = api.get(f"/admin/keys/{rec.id}").json()
        assert (shown["credits"], shown["tokens"]) == (debt, p + c)
        # a top-up smaller than the debt leaves the key refused
        topped = api.post(f"/admin/keys/{rec.id}/credits", json={"delta": -debt - 1})
        assert topped.status_code == 200, topped.text
        assert topped.json()["credits"] == -1
    assert post(priced.a.url, key, chat("unit-1")).status_code == 402
    done = run_cli("keys", "credits", rec.id, "--add", "5", "--json", redis_url=redis_server.url)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["credits"] == 4
    assert post(priced.a.url, key, chat("unit-1")).status_code == 200


def test_the_request_price_is_configurable_and_refunded_when_nothing_was_sent(
    spawn_edge: SpawnEdge,
    redis_server: RedisServer,
    upstream: FakeUpstream,
    make_key: MakeKey,
    r: redis.Redis,
) -> None:
    """`pricing.request = 3`: charged at admission (shown by /admin/pricing), given back when
    the upstream could not even be connected to; tokens are priced on top."""
    env = {"EDGE_PRICING_REQUEST": "3"}
    proc = spawn_edge(priced_env(redis_server.url, upstream.url, **env), name="price-3")
    closed = spawn_edge(
        priced_env(redis_server.url, f"http://127.0.0.1:{free_port()}/v1", **env), name="closed"
    )
    with admin(proc.url) as api:
        assert api.get("/admin/pricing").json()["request"] == 3
    key, rec = make_key("pro", credits=100)
    resp = post(proc.url, key, chat("unit-1"))
    p, c = usage_of(resp.json()["usage"])
    assert settled(r, rec.id, p + c).credits == 100 - 3 - p - 2 * c
    assert post(closed.url, key, chat("unit-1")).status_code == 502
    assert ledger(r, rec.id).credits == 100 - 3 - p - 2 * c  # the 3 given back


# Token limits.


def assert_token_headers(resp: httpx.Response, tpm: int, tpd: int | None = None) -> None:
    """The token headers every answer of a key with `tpm` carries."""
    assert resp.headers["x-ratelimit-limit-tokens"] == str(tpm)
    remaining = int(resp.headers["x-ratelimit-remaining-tokens"])
    assert 0 <= remaining <= tpm
    assert resp.headers["x-ratelimit-reset-tokens"].endswith("s")  # 0ms, 1.5s, 6m0s
    policy = resp.headers["ratelimit-policy"]
    assert f'"tokens-minute";q={tpm};w=60' in policy
    assert f'"tokens-minute";r={remaining};' in resp.headers["ratelimit"]
    if tpd is not None:
        assert f'"tokens-day";q={tpd};w=86400' in policy
    else:
        assert "tokens-day" not in policy


def test_tpm_admits_until_the_bucket_is_in_debt_then_429(
    priced: Pair, upstream: FakeUpstream, make_key: MakeKey, r: redis.Redis
) -> None:
    """Tokens are charged after the answer: a key is admitted while its minute bucket holds
    more than zero, so the request that takes it below zero still runs, the next is refused."""
    probe_key, _ = make_key("pro")
    p, c = usage_of(post(priced.a.url, probe_key, chat("m")).json()["usage"])
    used = p + c  # every request below uses as much
    tpm = 2 * used + used // 2  # after two requests half a request is left; after three, debt
    key, rec = make_key("pro", tpm=tpm)
    upstream.clear()
    before = scrape(priced.a.url)
    remaining = []
    for n in range(1, 4):
        resp = post(priced.a.url, key, chat("m"))
        assert resp.status_code == 200, resp.text
        assert_token_headers(resp, tpm)
        remaining.append(int(resp.headers["x-ratelimit-remaining-tokens"]))
        settled(r, rec.id, n * used)
    assert remaining[0] == tpm
    assert tpm - used <= remaining[1] <= tpm - used + 2  # a second or two of refill at most
    level = float(r.hget(key_tokens_bucket(rec.id), "tokens") or 0)
    assert -used // 2 - 1 <= level < 0  # in debt
    refused = post(priced.a.url, key, chat("m"))
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert "on tokens per min (TPM)" in error["message"]
    assert_token_headers(refused, tpm)
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"  # never negative
    # the debt refills at tpm/60 a second: about -level * 60 / tpm seconds to wait
    wait = int(refused.headers["retry-after"])
    assert wait >= 1 and abs(wait - math.ceil(-level * 60 / tpm)) <= 1
    assert "x-should-retry" not in refused.headers
    assert len(upstream.records) == 3
    after = scrape(priced.a.url)
    outcome = {"plan": "pro", "outcome": "rate_limited_tokens_minute"}
    assert metric_delta(before, after, "edge_requests_total", **outcome) == 1


def test_a_minute_token_bucket_in_debt_refuses_with_retry_after(
    priced: Pair, upstream: FakeUpstream, make_key: MakeKey, r: redis.Redis
) -> None:
    """A bucket seeded 100 tokens in debt at 60 tokens a minute: 429, retry in about 100 s."""
    key, rec = make_key("pro", tpm=60, tpd=100_000)
    seed_debt(r, rec.id, "tm", -100)
    resp = post(priced.a.url, key, chat("m"))
    assert resp.status_code == 429
    assert "on tokens per min (TPM)" in resp.json()["error"]["message"]
    assert 100 <= int(resp.headers["retry-after"]) <= 102  # 100 tokens at 1 a second
    assert_token_headers(resp, 60, 100_000)
    assert upstream.records == []


def test_a_day_token_bucket_in_debt_refuses_and_says_do_not_retry(
    priced: Pair, upstream: FakeUpstream, make_key: MakeKey, r: redis.Redis
) -> None:
    """tpd alone: a day bucket in debt refuses with TPD's message and `x-should-retry:
    false`; OpenAI's x-ratelimit-*-tokens headers are the minute window's, so absent."""
    key, rec = make_key("pro", tpd=1_000)
    seed_debt(r, rec.id, "td", -50)
    before = scrape(priced.a.url)
    resp = post(priced.a.url, key, chat("m"))
    assert resp.status_code == 429
    error = resp.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert "on tokens per day (TPD)" in error["message"]
    assert resp.headers["x-should-retry"] == "false"
    assert abs(int(resp.headers["retry-after"]) - 50 * 86_400 // 1_000) <= 2
    assert '"tokens-day";q=1000;w=86400' in resp.headers["ratelimit-policy"]
    assert "x-ratelimit-limit-tokens" not in resp.headers  # OpenAI's token headers: minute
    assert upstream.records == []
    outcome = {"plan": "pro", "outcome": "rate_limited_tokens_day"}
    assert metric_delta(before, scrape(priced.a.url), "edge_requests_total", **outcome) == 1


# Streams.


def test_a_metered_stream_is_given_include_usage_and_the_sdk_never_sees_the_usage_chunk(
    priced: Pair, upstream: FakeUpstream, make_key: MakeKey, r: redis.Redis
) -> None:
    """The official SDK streams without asking for usage: the upstream is asked for it, the
    SDK's every chunk has `choices[0]`, and the key is charged what the usage chunk said
    (what the same request reports unstreamed)."""
    key, rec = make_key("pro", credits=10_000)
    with sdk(priced.a.url, key) as client:
        plain = client.chat.completions.create(model="unit-s", messages=MESSAGES)
        assert plain.usage is not None
        p, c = plain.usage.prompt_tokens, plain.usage.completion_tokens
        settled(r, rec.id, p + c)
        upstream.clear()
        text = []
        with client.chat.completions.create(
            model="unit-s",
            messages=MESSAGES,
            stream=True,
        ) as stream:
            for chunk in stream:
                text.append(chunk.choices[0].delta.content or "")  # never an empty choices
                assert chunk.usage is None
    assert "".join(text).strip() == (plain.choices[0].message.content or "").strip()
    [record] = upstream.records
    assert INCLUDE_USAGE in record.body
    sent = json.loads(record.body)
    assert sent["stream_options"] == {"include_usage": True} and sent["stream"] is True
    assert sent["messages"] == MESSAGES
    now = settled(r, rec.id, 2 * (p + c))  # the stream's usage chunk said what the plain did
    assert now.credits == 10_000 - 2 * unit_cost(p, c)


def test_a_client_that_asked_for_usage_gets_its_usage_chunk(
    priced: Pair, upstream: FakeUpstream, make_key: MakeKey, r: redis.Redis
) -> None:
    """With `stream_options.include_usage` the SDK's last chunk has the usage and no choices,
    and that usage is what is charged."""
    key, rec = make_key("pro", credits=10_000)
    with (
        sdk(priced.a.url, key) as client,
        client.chat.completions.create(
            model="unit-s",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        ) as stream,
    ):
        chunks = list(stream)
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert all(chunk.choices for chunk in chunks[:-1])
    p, c = last.usage.prompt_tokens, last.usage.completion_tokens
    assert json.loads(upstream.records[0].body)["stream_options"] == {"include_usage": True}
    assert settled(r, rec.id, p + c).credits == 10_000 - unit_cost(p, c)


@pytest.mark.parametrize(
    "options",
    [{"include_usage": False, "continuous_usage_stats": False}, None],
    ids=["include_usage-false", "stream_options-null"],
)
def test_a_stream_whose_client_declined_usage_is_metered_all_the_same(
    priced: Pair,
    upstream: FakeUpstream,
    make_key: MakeKey,
    r: redis.Redis,
    options: dict[str, Any] | None,
) -> None:
    """`include_usage: false` (or `stream_options: null`) is not a way out of metering: edge
    asks for the usage, keeps the client's other options, and hides the usage chunk."""
    key, rec = make_key("pro", credits=10_000)
    p, c = usage_of(post(priced.a.url, key, chat("unit-s")).json()["usage"])
    settled(r, rec.id, p + c)
    resp = post(priced.a.url, key, chat("unit-s", stream=True, stream_options=options))
    assert resp.status_code == 200, resp.text
    events = sse_events(resp.content)
    assert events and all(event["choices"] for event in events)
    sent = json.loads(upstream.records[1].body)
    assert sent["stream_options"] == {**(options or {}), "include_usage": True}
    assert sent["messages"] == MESSAGES
    assert settled(r, rec.id, 2 * (p + c)).credits == 10_000 - 2 * unit_cost(p, c)


def test_a_metered_completions_stream_asks_for_usage_too(
    priced: Pair, upstream: FakeUpstream, make_key: MakeKey, r: redis.Redis
) -> None:
    """/v1/completions takes stream_options as Chat Completions does (the fake answers it
    with a whole JSON completion, usage included: that usage is charged)."""
    key, rec = make_key("pro", credits=10_000)
    body = b'{"model": "unit-t", "prompt": "say this", "stream": true}'
    resp = post(priced.a.url, key, body, "/v1/completions")
    assert resp.status_code == 200, resp.text
    p, c = usage_of(resp.json()["usage"])
    sent = json.loads(upstream.records[0].body)
    assert sent == {**json.loads(body), "stream_options": {"include_usage": True}}
    assert settled(r, rec.id, p + c).credits == 10_000 - unit_cost(p, c)


def test_stream_usage_client_never_touches_the_body_and_estimates_the_stream(
    spawn_edge: SpawnEdge,
    redis_server: RedisServer,
    upstream: FakeUpstream,
    make_key: MakeKey,
    r: redis.Redis,
) -> None:
    """`metering.stream_usage = "client"`: the body goes up byte for byte, and a stream that
    reports no usage is charged its estimate; one whose client asked is charged its usage."""
    proc = spawn_edge(
        priced_env(redis_server.url, upstream.url, EDGE_METERING_STREAM_USAGE="client")
    )
    key, rec = make_key("pro", credits=10_000)
    body = chat("unit-s", stream=True)
    before = scrape(proc.url)
    resp = post(proc.url, key, body)
    assert resp.status_code == 200, resp.text
    assert upstream.records[0].body == body  # byte for byte
    assert all(event["choices"] for event in sse_events(resp.content))
    tokens_in, tokens_out = estimate(len(body)), estimate(len(resp.content))
    now = settled(r, rec.id, tokens_in + tokens_out)
    assert now.credits == 10_000 - unit_cost(tokens_in, tokens_out)
    assert token_deltas(before, scrape(proc.url), "pro") == {
        ("input", "reported"): 0,
        ("output", "reported"): 0,
        ("input", "estimated"): tokens_in,
        ("output", "estimated"): tokens_out,
    }
    # a client that asks for usage itself is charged what the stream reported
    asked = chat("unit-s", stream=True, stream_options={"include_usage": True})
    resp = post(proc.url, key, asked)
    p, c = usage_of(sse_events(resp.content)[-1]["usage"])
    assert upstream.records[1].body == asked
    settled(r, rec.id, tokens_in + tokens_out + p + c)


# Providers that write their answers otherwise: spaces, usage in pieces, running usage,
# compression, usage before the data.


@pytest.fixture(scope="module")
def raw_pair(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[tuple[RawUpstream, EdgeProcess]]:
    raw = RawUpstream().start()
    proc = EdgeProcess(
        tmp_path_factory.mktemp("metering-raw"), priced_env(redis_server.url, raw.url), "raw"
    )
    try:
        yield raw, proc.start()
    finally:
        proc.stop()
        raw.stop()


@pytest.fixture
def raw_edge(raw_pair: tuple[RawUpstream, EdgeProcess]) -> tuple[RawUpstream, EdgeProcess]:
    """A priced edge in front of a raw-socket upstream the test scripts (its log cleared)."""
    raw_pair[0].clear()
    return raw_pair


def spaced(obj: dict[str, Any]) -> bytes:
    """JSON as some providers write it: `"usage" : {`."""
    return json.dumps(obj, separators=(", ", " : ")).encode()


def chunk_event(choices: list[Any], usage: dict[str, Any] | None) -> bytes:
    chunk = {"id": "chatcmpl-raw", "object": "chat.completion.chunk", "created": 1}
    chunk.update({"model": "frac-1", "choices": choices, "usage": usage})
    return b"data: " + spaced(chunk) + b"\n\n"


def delta(text: str, finish: str | None = None) -> list[dict[str, Any]]:
    return [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]


def chunked_answer(pieces: list[bytes], gap: float) -> Callable[[], Iterator[bytes]]:
    """An SSE answer in chunked encoding, each piece its own write `gap` seconds apart."""

    def send() -> Iterator[bytes]:
        yield b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        yield b"Transfer-Encoding: chunked\r\n\r\n"
        for piece in pieces:
            time.sleep(gap)
            yield b"%x\r\n%s\r\n" % (len(piece), piece)
        yield b"0\r\n\r\n"

    return send


CACHED_USAGE = {
    "prompt_tokens": 100,
    "completion_tokens": 10,
    "total_tokens": 110,
    "prompt_tokens_details": {"cached_tokens": 40},
}


def test_a_spaced_provider_stream_is_read_and_its_usage_chunk_stripped_even_when_split(
    raw_edge: tuple[RawUpstream, EdgeProcess], make_key: MakeKey, r: redis.Redis
) -> None:
    """A provider writing `"usage" : {` and `"choices" : []`, its usage chunk split across two
    writes: read (cached tokens at the cached price) and kept from the SDK all the same."""
    raw, proc = raw_edge
    usage_chunk = chunk_event([], CACHED_USAGE)
    assert b'"usage" : {' in usage_chunk and b'"choices" : []' in usage_chunk
    half = len(usage_chunk) // 2
    pieces = [
        chunk_event(delta("Hello"), None),
        chunk_event(delta(" there", "stop"), None),
        usage_chunk[:half],  # the usage chunk arrives in two pieces
        usage_chunk[half:] + b"data: [DONE]\n\n",
    ]
    raw.route("/v1/chat/completions", Raw(chunked_answer(pieces, 0.05)))
    key, rec = make_key("pro", credits=10_000)
    with sdk(proc.url, key) as client:
        stream = client.chat.completions.create(
            model="frac-1",
            messages=MESSAGES,
            stream=True,
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == "Hello there"
    assert INCLUDE_USAGE in raw.records[0].body
    cost = cost_micros(FRAC, 100, 10, cached=40)
    assert cost == 60 * 333_333 + 40 * 111_111 + 10 * 777_777
    now = settled(r, rec.id, 110)
    assert now == Ledger(10_000 - 1 - cost // 10**6, cost % 10**6, 110)


def test_a_spaced_json_answer_with_cached_tokens_is_priced_at_the_cached_price(
    raw_edge: tuple[RawUpstream, EdgeProcess], make_key: MakeKey, r: redis.Redis
) -> None:
    """(100 - 40) * input + 40 * cached_input + 10 * output micro-credits, relayed untouched."""
    raw, proc = raw_edge
    answer = spaced(
        {
            "id": "chatcmpl-raw",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
            "usage": CACHED_USAGE,
            "system_fingerprint": "fp",
        }
    )
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    raw.route("/v1/chat/completions", Raw(head % len(answer) + answer))
    key, rec = make_key("pro", credits=10_000)
    resp = post(proc.url, key, chat("frac-1"))
    assert resp.status_code == 200 and resp.content == answer
    cost = cost_micros(FRAC, 100, 10, cached=40)
    assert settled(r, rec.id, 110) == Ledger(10_000 - 1 - cost // 10**6, cost % 10**6, 110)


def test_a_stream_reporting_running_usage_is_charged_its_last_report(
    raw_edge: tuple[RawUpstream, EdgeProcess], make_key: MakeKey, r: redis.Redis
) -> None:
    """Some providers put the running usage on every chunk (vLLM's continuous usage stats);
    the last report is the answer's usage, and the usage-only chunk is still not the
    client's."""
    raw, proc = raw_edge
    running = [
        chunk_event(delta(f"w{i} "), {"prompt_tokens": 100, "completion_tokens": i})
        for i in range(1, 6)
    ]
    final = {"prompt_tokens": 100, "completion_tokens": 6, "total_tokens": 106}
    pieces = [*running, chunk_event([], final), b"data: [DONE]\n\n"]
    raw.route("/v1/chat/completions", Raw(chunked_answer(pieces, 0.02)))
    key, rec = make_key("pro", credits=10_000)
    resp = post(proc.url, key, chat("unit-1", stream=True))
    assert resp.status_code == 200
    assert wait_until(lambda: ledger(r, rec.id).tokens > 0, SETTLED)  # its one settlement
    usage_only = [event for event in sse_events(resp.content) if not event["choices"]]
    assert (ledger(r, rec.id), usage_only) == (Ledger(10_000 - unit_cost(100, 6), 0, 106), [])


def test_a_compressed_json_answer_is_charged_its_reported_usage(
    raw_edge: tuple[RawUpstream, EdgeProcess], make_key: MakeKey, r: redis.Redis
) -> None:
    """The official SDK asks for gzip (`Accept-Encoding: gzip, deflate`), and providers
    compress JSON answers when asked; edge relays them compressed. The usage inside is still
    the answer's usage: charged as reported, not estimated from compressed bytes."""
    raw, proc = raw_edge
    answer = json.dumps(
        {
            "id": "chatcmpl-gz",
            "object": "chat.completion",
            "created": 1,
            "model": "unit-1",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok " * 300},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 50, "completion_tokens": 300, "total_tokens": 350},
        }
    ).encode()

    def compressed_when_asked() -> Iterator[bytes]:
        asked = raw.records[-1].header("accept-encoding") or ""  # the request being answered
        payload = gzip.compress(answer) if "gzip" in asked else answer
        coding = b"Content-Encoding: gzip\r\n" if "gzip" in asked else b""
        yield b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + coding
        yield b"Content-Length: %d\r\n\r\n" % len(payload) + payload

    raw.route("/v1/chat/completions", Raw(compressed_when_asked))
    key, rec = make_key("pro", credits=10_000)
    with sdk(proc.url, key) as client:
        completion = client.chat.completions.create(model="unit-1", messages=MESSAGES)
    assert completion.usage is not None and completion.usage.completion_tokens == 300
    assert wait_until(lambda: ledger(r, rec.id).tokens > 0, SETTLED)  # its one settlement
    assert ledger(r, rec.id) == Ledger(10_000 - unit_cost(50, 300), 0, 350)


def test_an_embeddings_answer_with_its_usage_before_its_vectors_is_charged_as_reported(
    raw_edge: tuple[RawUpstream, EdgeProcess], make_key: MakeKey, r: redis.Redis
) -> None:
    """JSON objects have no field order: a provider may write `usage` before a large `data`
    (many vectors). The usage reported is the usage, wherever it stands in the answer."""
    raw, proc = raw_edge
    vectors = [
        {"object": "embedding", "index": i, "embedding": [0.0123456] * 512} for i in range(20)
    ]
    answer = json.dumps(
        {
            "model": "unit-e",
            "object": "list",
            "usage": {"prompt_tokens": 40, "total_tokens": 40},
            "data": vectors,
        }
    ).encode()
    assert len(answer) > 64 * 1024
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    raw.route("/v1/embeddings", Raw(head % len(answer) + answer))
    key, rec = make_key("pro", credits=100_000)
    body = json.dumps({"model": "unit-e", "input": ["a b c d"] * 10}).encode()
    resp = post(proc.url, key, body, "/v1/embeddings")
    assert resp.status_code == 200 and resp.content == answer
    assert wait_until(lambda: ledger(r, rec.id).tokens > 0, SETTLED)  # its one settlement
    assert ledger(r, rec.id) == Ledger(100_000 - unit_cost(40, 0), 0, 40)


# The Responses API and Embeddings.


def test_the_responses_api_is_metered_from_its_usage_plain_and_streamed(
    priced: Pair, upstream: FakeUpstream, make_key: MakeKey, r: redis.Redis
) -> None:
    """`usage.input_tokens` / `output_tokens` of the response, and of `response.completed` in
    a stream (whose body is not touched: stream_options is Chat Completions')."""
    key, rec = make_key("pro", credits=10_000)
    knob = {"x-fake-api": "responses"}
    body = b'{"model": "unit-r", "input": "tell me a story"}'
    plain = post(priced.a.url, key, body, "/v1/responses", **knob)
    assert plain.status_code == 200, plain.text
    p1, c1 = usage_of(plain.json()["usage"])
    settled(r, rec.id, p1 + c1)
    streamed_body = b'{"model": "unit-r", "input": "tell me a story", "stream": true}'
    streamed = post(priced.a.url, key, streamed_body, "/v1/responses", **knob)
    assert streamed.status_code == 200, streamed.text
    [completed] = [e for e in sse_events(streamed.content) if e["type"] == "response.completed"]
    p2, c2 = usage_of(completed["response"]["usage"])
    assert upstream.records[1].body == streamed_body  # not a Chat Completions stream: untouched
    now = settled(r, rec.id, p1 + c1 + p2 + c2)
    assert now.credits == 10_000 - unit_cost(p1, c1) - unit_cost(p2, c2)


def test_embeddings_are_metered_from_their_prompt_tokens(
    priced: Pair, make_key: MakeKey, r: redis.Redis
) -> None:
    """Embeddings report `prompt_tokens` only: input tokens, no output."""
    key, rec = make_key("pro", credits=10_000)
    body = b'{"model": "unit-e", "input": ["one two", "three four five"]}'
    resp = post(priced.a.url, key, body, "/v1/embeddings")
    assert resp.status_code == 200, resp.text
    p, c = usage_of(resp.json()["usage"])
    assert c == 0 and p > 0
    assert settled(r, rec.id, p).credits == 10_000 - unit_cost(p, 0)


# Estimates: answers that report no usage.


def test_an_answer_without_usage_is_charged_an_estimate_from_its_bytes(
    priced: Pair, upstream: FakeUpstream, make_key: MakeKey, r: redis.Redis
) -> None:
    """ceil(request bytes / 4) in, ceil(answer bytes / 4) out, priced by the body's model and
    counted as `source="estimated"`."""
    key, rec = make_key("pro", credits=10_000)
    body = b'{"model": "unit-x", "input": "no usage comes back for this one"}'
    before = scrape(priced.a.url)
    resp = post(priced.a.url, key, body, "/v1/responses")  # the fake echoes: no usage
    assert resp.status_code == 200 and "usage" not in resp.json()
    tokens_in, tokens_out = estimate(len(body)), estimate(len(resp.content))
    assert upstream.records[0].sent_bytes == len(resp.content)
    now = settled(r, rec.id, tokens_in + tokens_out)
    assert now.credits == 10_000 - unit_cost(tokens_in, tokens_out)
    after = scrape(priced.a.url)
    assert token_deltas(before, after, "pro") == {
        ("input", "reported"): 0,
        ("output", "reported"): 0,
        ("input", "estimated"): tokens_in,
        ("output", "estimated"): tokens_out,
    }
    assert metric_delta(before, after, "edge_credits_charged_total", plan="pro") == (
        tokens_in + 2 * tokens_out
    )


def stream_until_cut(url: str, key: str, body: bytes, **knobs: str) -> bytes:
    """The body bytes a client received of a stream edge ended without its final chunk."""
    received = b""
    headers = auth(key, **{"Content-Type": "application/json", **knobs})
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", headers=headers, content=body, timeout=10
    ) as resp:
        assert resp.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            for piece in resp.iter_raw():
                received += piece
    return received


def test_a_stream_cut_mid_way_is_charged_an_estimate(
    priced: Pair, upstream: FakeUpstream, make_key: MakeKey, r: redis.Redis
) -> None:
    """The upstream resets the stream: what crossed is charged, estimated."""
    key, rec = make_key("pro", credits=10_000)
    body = chat("unit-x", stream=True)
    knobs = {"x-fake-chunks": "10", "x-fake-gap-ms": "20", "x-fake-reset-after": "6"}
    received = stream_until_cut(priced.a.url, key, body, **knobs)
    [record] = upstream.records
    assert 0 < len(received) <= record.sent_bytes  # whole events, then the reset
    tokens_in, tokens_out = estimate(len(body)), estimate(len(received))
    now = settled(r, rec.id, tokens_in + tokens_out)
    assert now.credits == 10_000 - unit_cost(tokens_in, tokens_out)


def test_a_client_that_leaves_mid_stream_is_charged_an_estimate(
    priced: Pair, upstream: FakeUpstream, make_key: MakeKey, r: redis.Redis
) -> None:
    """A client that leaves three events into a long stream: the request, and what edge had
    received of the answer by then, estimated."""
    key, rec = make_key("pro", credits=10_000)
    body = chat("unit-x", stream=True)
    headers = auth(key, **{"x-fake-chunks": "200", "x-fake-gap-ms": "20"})
    received = b""
    with httpx.stream(
        "POST", f"{priced.a.url}/v1/chat/completions", headers=headers, content=body, timeout=10
    ) as resp:
        for piece in resp.iter_raw():
            received += piece
            if received.count(b"\n\n") >= 3:
                break  # leave, three events in
    [record] = upstream.records
    assert upstream.wait_for(lambda: record.client_gone is not None)
    assert wait_until(lambda: ledger(r, rec.id).tokens > 0, SETTLED)
    tokens = ledger(r, rec.id).tokens
    tokens_out = tokens - estimate(len(body))
    # edge saw at least what it passed on, at most what the upstream sent before it left
    assert estimate(len(received)) <= tokens_out <= estimate(record.sent_bytes)
    assert ledger(r, rec.id).credits == 10_000 - unit_cost(estimate(len(body)), tokens_out)


def test_a_client_that_leaves_before_the_answer_is_charged_its_request(
    priced: Pair, upstream: FakeUpstream, make_key: MakeKey, r: redis.Redis
) -> None:
    """A non-streamed answer comes whole, after the whole generation: a client that leaves
    while the upstream is still at work has had its request received and processed. It is
    charged at least its request's estimate, ceil(body bytes / 4): leaving is not free."""
    key, rec = make_key("pro", credits=10_000)
    body = chat("unit-x")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{priced.a.url}/v1/chat/completions",
            headers=auth(key, **{"x-fake-delay-ms": "1500"}),
            content=body,
            timeout=httpx.Timeout(10, read=0.3),
        )
    [record] = upstream.records
    assert record.body == body
    assert upstream.wait_for(lambda: record.client_gone is not None)  # edge let go of it
    charged = wait_until(lambda: ledger(r, rec.id).tokens >= estimate(len(body)), 2.0)
    assert charged, f"left after the upstream got it, charged {ledger(r, rec.id)}"


def test_an_upstream_error_charges_no_tokens(
    priced: Pair, make_key: MakeKey, r: redis.Redis
) -> None:
    """An upstream 500: the request price was charged at admission, no tokens on top (not
    even an estimate), and nothing in the token bucket."""
    key, rec = make_key("pro", credits=10_000, tpm=60)
    before = scrape(priced.a.url)
    resp = post(priced.a.url, key, chat("unit-x"), **{"x-fake-status": "500"})
    assert resp.status_code == 500
    assert_token_headers(resp, 60)  # every answer of a key with tpm, the upstream's too
    # a later request's settlement lands after the error's would have: then look
    good = post(priced.a.url, key, chat("unit-x"))
    p, c = usage_of(good.json()["usage"])
    now = settled(r, rec.id, p + c)
    assert now.credits == 10_000 - 1 - unit_cost(p, c)  # the request price, no token price
    assert float(r.hget(key_tokens_bucket(rec.id), "tokens") or 0) >= 60 - (p + c)
    after = scrape(priced.a.url)
    assert token_deltas(before, after, "pro")[("input", "estimated")] == 0
    assert token_deltas(before, after, "pro")[("output", "estimated")] == 0


# Redis commands per request.


def test_unmetered_keys_cost_one_redis_command_and_metered_ones_at_most_two(
    priced: Pair,
    edge: EdgeProcess,
    upstream: FakeUpstream,
    redis_server: RedisServer,
    make_key: MakeKey,
    r: redis.Redis,
) -> None:
    """With token prices configured, a key with neither a balance nor a token limit is not
    metered: its body is not parsed (a stream goes up untouched) and each request is one
    EVALSHA. Without token prices (the session's edge), a balance alone meters nothing. A
    metered key: admission plus one settle.lua call."""
    plain, _ = make_key("pro")
    paying, _ = make_key("pro", credits=1_000)
    metered, rec = make_key("pro", credits=1_000, tpm=100_000)
    body = chat("unit-1", stream=True)
    r.ping()  # this client's own connection is made before counting
    with CommandCounter(redis_server.port) as counter:
        for _ in range(3):
            assert post(priced.a.url, plain, body).status_code == 200
            assert post(edge.url, paying, body).status_code == 200
        assert post(priced.a.url, metered, chat("unit-1")).status_code == 200
        # settle.lua is the last command any of these requests sends: wait for its effect
        assert wait_until(lambda: r.hget(record_key(rec.id), "tokens") is not None, SETTLED)
    assert [c for c in counter.commands if c != "HGET"] == ["EVALSHA"] * 8  # 6 + 1 + 1
    assert [record.body for record in upstream.records[:6]] == [body] * 6


# Settlement failures.


def test_a_settlement_that_cannot_be_written_is_counted_and_the_answer_not_delayed(
    spawn_edge: SpawnEdge,
    redis_factory: Callable[..., RedisServer],
    upstream: FakeUpstream,
) -> None:
    """Redis dies while a metered stream is still being answered: the stream ends on time
    (settling never holds an answer), and after its retries (about 4 s) the lost settlement
    is counted."""
    own = redis_factory()
    proc = spawn_edge(priced_env(own.url, upstream.url), name="settle-fail")
    key, _ = new_key(own.url, "pro", credits=1_000)
    headers = auth(key, **{"x-fake-chunks": "5", "x-fake-gap-ms": "100"})
    assert value(scrape(proc.url), "edge_settlement_failures_total") == 0
    body = chat("unit-1", stream=True)
    received = b""
    killed = 0.0
    with httpx.stream(
        "POST", f"{proc.url}/v1/chat/completions", headers=headers, content=body, timeout=10
    ) as resp:
        assert resp.status_code == 200
        for piece in resp.iter_raw():
            if not received:
                own.kill()  # admitted; settling is what remains to be written
                killed = time.monotonic()
            received += piece
    ended = time.monotonic() - killed
    assert received.endswith(b"data: [DONE]\n\n")
    assert ended < 1.5  # the rest of the stream (4 gaps of 0.1 s), not the settle retries
    assert wait_until(
        lambda: value(scrape(proc.url), "edge_settlement_failures_total") == 1, 10, every=0.2
    )
    assert "could not settle" in proc.log()


def test_a_settlement_retried_after_a_timeout_is_charged_once_and_counted(
    redis_factory: Callable[..., RedisServer],
    spawn_edge: SpawnEdge,
    upstream: FakeUpstream,
) -> None:
    """Redis stalls (SIGSTOP) while a metered answer ends: the settle.lua calls sent meanwhile
    time out but sit in Redis's input and run when it resumes; the retry that succeeds then
    carries the same settlement id. The key is charged once; the metrics say what was
    charged, and nothing is counted lost."""
    own = redis_factory()  # (set up first, so stopped after the edge: no settle is cut short)
    proc = spawn_edge(priced_env(own.url, upstream.url), name="settle-retry")
    key, rec = new_key(own.url, "pro", credits=1_000)
    headers = auth(key, **{"x-fake-chunks": "5", "x-fake-gap-ms": "100"})
    body = chat("unit-1", stream=True)
    received = b""
    with httpx.stream(
        "POST", f"{proc.url}/v1/chat/completions", headers=headers, content=body, timeout=10
    ) as resp:
        for piece in resp.iter_raw():
            if not received:
                own.pause()  # admitted; its settlement will be sent to a stalled Redis
            received += piece
    time.sleep(0.6)  # two attempts time out (0.25 s each) before Redis comes back
    own.resume()
    tokens_in, tokens_out = estimate_pair(body, received)
    with own.client() as client:
        assert wait_until(lambda: ledger(client, rec.id).tokens >= tokens_in + tokens_out, 8)
        assert ledger(client, rec.id) == Ledger(
            1_000 - unit_cost(tokens_in, tokens_out), 0, tokens_in + tokens_out
        )
    assert value(scrape(proc.url), "edge_redis_errors_total", kind="timeout") >= 1

    def charged() -> float:
        return value(scrape(proc.url), "edge_credits_charged_total", plan="pro")

    counted = wait_until(lambda: charged() == tokens_in + 2 * tokens_out, 3, every=0.2)
    assert (counted, charged()) == (True, tokens_in + 2 * tokens_out)
    assert value(scrape(proc.url), "edge_settlement_failures_total") == 0
    assert "could not settle" not in proc.log()


# The admin API and the CLI.


def expected_pricing() -> dict[str, Any]:
    return {"request": 1, "models": [{"cached_input": None, **price} for price in PRICES]}


def test_pricing_and_plans_are_shown_by_the_admin_api_and_the_cli(
    priced: Pair, redis_server: RedisServer
) -> None:
    """`GET /admin/pricing` and `edge pricing --json` say the same; plans show tpm/tpd."""
    with admin(priced.a.url) as api:
        pricing = api.get("/admin/pricing")
        plans = api.get("/admin/plans")
    assert pricing.status_code == 200, pricing.text
    assert pricing.json() == expected_pricing()
    rows = {row["plan"]: row for row in plans.json()["data"]}
    assert (rows["team"]["tpm"], rows["team"]["tpd"]) == (TEAM_TPM, TEAM_TPD)
    assert (rows["pro"]["tpm"], rows["pro"]["tpd"]) == (None, None)
    shown = run_cli(
        "pricing",
        "--json",
        redis_url=redis_server.url,
        EDGE_PRICING_MODELS=json.dumps(PRICES),
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == expected_pricing()
    listed = run_cli("plans", "--json", redis_url=None, EDGE_PLANS_TEAM_TPM=str(TEAM_TPM))
    assert {row["plan"]: row["tpm"] for row in json.loads(listed.stdout)}["team"] == TEAM_TPM


def test_token_limits_on_a_key_are_shown_and_changed_live(
    priced: Pair, make_key: MakeKey, r: redis.Redis
) -> None:
    """A team key has the plan's token limits; the record shows them and the tokens used;
    PATCH `{"tpm": 5}` holds at the very next request on the other instance, `null` clears."""
    key, rec = make_key("team")
    resp = post(priced.b.url, key, chat("m"))
    assert_token_headers(resp, TEAM_TPM, TEAM_TPD)  # the plan's limits
    p, c = usage_of(resp.json()["usage"])
    settled(r, rec.id, p + c)
    with admin(priced.a.url) as api:
        shown = api.get(f"/admin/keys/{rec.id}").json()
        assert {k: shown[k] for k in ("tpm", "tpd", "tpm_override", "tpd_override", "tokens")} == {
            "tpm": TEAM_TPM,
            "tpd": TEAM_TPD,
            "tpm_override": None,
            "tpd_override": None,
            "tokens": p + c,
        }
        changed = api.patch(f"/admin/keys/{rec.id}", json={"tpm": 5})
        assert changed.status_code == 200, changed.text
        assert (changed.json()["tpm"], changed.json()["tpm_override"]) == (5, 5)
        # the next request, on the other instance, uses it: the bucket is full at 5
        resp = post(priced.b.url, key, chat("m"))
        assert_token_headers(resp, 5, TEAM_TPD)
        settled(r, rec.id, 2 * (p + c))
        refused = post(priced.b.url, key, chat("m"))  # 5 - (p + c) < 0: in debt
        assert refused.status_code == 429
        assert "on tokens per min (TPM)" in refused.json()["error"]["message"]
        cleared = api.patch(f"/admin/keys/{rec.id}", json={"tpm": None})
        assert (cleared.json()["tpm"], cleared.json()["tpm_override"]) == (TEAM_TPM, None)
    resp = post(priced.b.url, key, chat("m"))
    assert resp.status_code == 200
    assert_token_headers(resp, TEAM_TPM, TEAM_TPD)


def test_the_cli_creates_and_sets_token_limits(
    priced: Pair, redis_server: RedisServer, r: redis.Redis
) -> None:
    """`edge keys create --tpm --tpd`: both buckets are charged what an answer used;
    `set-limits --tpm plan` clears the minute override (pro has none), the day one stays."""
    created = run_cli(
        "keys", "create", "--plan", "pro", "--tpm", "7000", "--tpd", "80000", "--credits", "9",
        "--json", redis_url=redis_server.url,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    made = json.loads(created.stdout)
    fields = ("tpm", "tpd", "tpm_override", "tpd_override", "credits", "tokens")
    assert {name: made[name] for name in fields} == {
        "tpm": 7000,
        "tpd": 80000,
        "tpm_override": 7000,
        "tpd_override": 80000,
        "credits": 9,
        "tokens": 0,
    }
    resp = post(priced.a.url, made["key"], chat("m"))
    assert_token_headers(resp, 7000, 80000)
    p, c = usage_of(resp.json()["usage"])
    settled(r, made["id"], p + c)  # both token buckets were charged
    for window, limit in (("tm", 7000), ("td", 80000)):
        level = float(r.hget(key_tokens_bucket(made["id"], window), "tokens") or 0)
        assert limit - p - c <= level <= limit - p - c + 2
    done = run_cli(
        "keys", "set-limits", made["id"], "--tpm", "plan", "--json", redis_url=redis_server.url
    )
    assert done.returncode == 0, done.stderr
    assert (json.loads(done.stdout)["tpm"], json.loads(done.stdout)["tpd"]) == (None, 80000)
    resp = post(priced.a.url, made["key"], chat("m"))
    assert "x-ratelimit-limit-tokens" not in resp.headers  # pro has no tpm: only the day limit
    assert '"tokens-day";q=80000;w=86400' in resp.headers["ratelimit-policy"]


# What the price is read from: bodies that do not arrive in one piece, bodies with two models.


def test_a_long_prompt_is_priced_by_its_model_too(
    priced: Pair, upstream: FakeUpstream, make_key: MakeKey, r: redis.Redis
) -> None:
    """A request body larger than what arrives with its head (here 400 KB: a long context)
    is still the request's body: its model prices its tokens, and a stream of it asks for
    usage like any other."""
    key, rec = make_key("pro", credits=1_000_000)
    long_text = " ".join(["word"] * 80_000)
    body = json.dumps({"model": "unit-1", "messages": [{"role": "user", "content": long_text}]})
    resp = post(priced.a.url, key, body.encode())
    assert resp.status_code == 200, resp.text
    p, c = usage_of(resp.json()["usage"])
    assert p >= 80_000
    now = settled(r, rec.id, p + c)
    streamed = json.dumps({**json.loads(body), "stream": True}).encode()
    assert post(priced.a.url, key, streamed).status_code == 200
    assert (now.credits, INCLUDE_USAGE in upstream.records[1].body) == (
        1_000_000 - unit_cost(p, c),
        True,
    )


def test_a_body_sent_in_two_writes_is_priced_by_its_model_too(
    priced: Pair, make_key: MakeKey, r: redis.Redis
) -> None:
    """Any client may send its body in pieces (a slow network does it unasked); the price
    cannot depend on it."""
    key, rec = make_key("pro", credits=10_000)
    body = chat("unit-1")
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{priced.a.port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", priced.a.port), timeout=10) as sock:
        sock.sendall(head + body[:10])
        time.sleep(0.1)  # the first piece is read before the rest is sent
        sock.sendall(body[10:])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status, _, rest = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200"), answer[:300]
    p, c = usage_of(json.loads(rest)["usage"])
    assert settled(r, rec.id, p + c).credits == 10_000 - unit_cost(p, c)


def test_a_body_naming_two_models_is_not_priced_as_the_cheaper(
    priced: Pair, upstream: FakeUpstream, make_key: MakeKey, r: redis.Redis
) -> None:
    """`model` and `MODEL`: an upstream that matches names ignoring case (Go's encoding/json,
    the fake's x-fake-go-json) runs the last one. Model scopes refuse such a body (400); a
    price must not be the cheap model's while the upstream runs the dear one."""
    key, rec = make_key("pro", credits=10_000)
    body = b'{"model": "tiny-1", "MODEL": "unit-1", "input": "x"}'
    resp = post(priced.a.url, key, body, "/v1/responses", **{"x-fake-go-json": "1"})
    if resp.status_code == 400:  # refused, as model scopes refuse it: nothing ran
        assert upstream.records == []
        return
    assert resp.json()["model"] == "unit-1"  # what the upstream ran
    tokens_in, tokens_out = estimate(len(body)), estimate(len(resp.content))
    now = settled(r, rec.id, tokens_in + tokens_out)
    assert now.credits == 10_000 - unit_cost(tokens_in, tokens_out), "priced as tiny-1"
