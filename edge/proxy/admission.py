"""Admission: one `admit.lua` call per request, decoded into a `Decision`; what a rejection
answers (`rejection`); and the rate-limit headers that tell the client where it stands.

The I/O is one await; decoding the reply, mapping a decision to its answer and building the
headers are plain functions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from enum import IntEnum
from functools import lru_cache
from typing import Any, NamedTuple

from edge import errors
from edge.errors import Headers, RedisUnavailable
from edge.keys import ParsedKey, admit_keys, record_key, settle_keys
from edge.metrics.registry import Metrics
from edge.redis.scripts import Scripts
from edge.redis.types import ScriptClient
from edge.settings import Plan


class Code(IntEnum):
    """admit.lua's first reply entry (see the script's header)."""

    ADMITTED = 0
    UNKNOWN = 1
    REVOKED = 2
    EXPIRED = 3
    PAUSED = 4
    MINUTE_EMPTY = 5
    DAY_EMPTY = 6
    PLAN_MISSING = 7
    OUT_OF_SCOPE = 8
    NO_CREDITS = 9
    NEED_MODEL = 10
    MODEL_UNREADABLE = 11
    TOKENS_MINUTE_EMPTY = 12
    TOKENS_DAY_EMPTY = 13
    SHADOW_MINUTE = 14  # admitted: a shadowed key that 5, 6, 12 or 13 would have refused
    SHADOW_DAY = 15
    SHADOW_TOKENS_MINUTE = 16
    SHADOW_TOKENS_DAY = 17


ADMITTED = frozenset({Code.ADMITTED, *range(Code.SHADOW_MINUTE, Code.SHADOW_TOKENS_DAY + 1)})
SHADOW_OUTCOMES = {
    Code.SHADOW_MINUTE: "shadow_limited_minute",
    Code.SHADOW_DAY: "shadow_limited_day",
    Code.SHADOW_TOKENS_MINUTE: "shadow_limited_tokens_minute",
    Code.SHADOW_TOKENS_DAY: "shadow_limited_tokens_day",
}


NO_LIMIT = -1  # tpm / tpd: the key has no token limit
OUT_OF_SCOPE_ROUTE, OUT_OF_SCOPE_MODEL = 1, 2  # what code 8 says was out of scope (entry 3)
SCOPED_MODELS, SCOPED_ROUTES, HAS_BALANCE = 1, 2, 4  # the reply's flags
MODEL_NOT_READ = ""
MODEL_MISSING = "!"
NO_BODY = "~"  # a bodyless request: model scopes have nothing to check


class Decision(NamedTuple):
    code: Code
    plan: str
    rpm: int = 0
    rpd: int = 0
    minute_remaining: int = 0
    minute_reset_ms: int = 0
    day_remaining: int = 0
    day_reset_ms: int = 0
    retry_ms: int = 0
    credits: int = 0  # the balance after this request (see `has_balance`)
    flags: int = 0  # SCOPED_MODELS | SCOPED_ROUTES | HAS_BALANCE
    expires: int = 0  # the key's expiry, unix s (0: never)
    tpm: int = NO_LIMIT  # token limits
    tpd: int = NO_LIMIT
    tokens_minute: int = 0  # LLM tokens left in the minute bucket (may be negative)
    tokens_minute_reset_ms: int = 0  # until it is full
    tokens_day: int = 0
    tokens_day_reset_ms: int = 0

    @property
    def model_scoped(self) -> bool:
        """The key has model scopes: its request bodies must be read before admission."""
        return bool(self.flags & SCOPED_MODELS)

    @property
    def scoped(self) -> bool:
        return bool(self.flags & (SCOPED_MODELS | SCOPED_ROUTES))

    @property
    def has_balance(self) -> bool:
        """The key spends credits (else unlimited)."""
        return bool(self.flags & HAS_BALANCE)

    @property
    def token_limited(self) -> bool:
        return self.tpm != NO_LIMIT or self.tpd != NO_LIMIT


CODES = tuple(Code)  # by value: indexing is ~20x cheaper than Code(value)
NO_TOKENS = (NO_LIMIT, NO_LIMIT, 0, 0, 0, 0)
_new = tuple.__new__  # a Decision without its generated __new__: every request decodes one


def decode(reply: Sequence[Any]) -> Decision:
    """The script's flat reply (see the header of admit.lua) as a `Decision`. Its numbers are
    Redis integer replies (ints, from every client edge uses)."""
    if len(reply) == 1:
        return Decision(CODES[reply[0]], "")
    plan = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
    if len(reply) == 2:
        return Decision(CODES[reply[0]], plan)
    if len(reply) == 12:  # a key without token limits
        return _new(Decision, (CODES[reply[0]], plan, *reply[2:12], *NO_TOKENS))
    return _new(Decision, (CODES[reply[0]], plan, *reply[2:18]))


def model_state(model: str | None) -> str:
    """admit.lua's ARGV[3] for a body that was read: its model, or that it has none."""
    return MODEL_MISSING if model is None else "=" + model


def plan_args(plans: Mapping[str, Plan]) -> list[str | int]:
    """The plan table as admit.lua's ARGV tail: name, rpm, rpd, tpm, tpd (-1: no limit),
    shadow (1: observed, not enforced), name, …"""
    args: list[str | int] = []
    for name, plan in plans.items():
        tpm = NO_LIMIT if plan.tpm is None else plan.tpm
        tpd = NO_LIMIT if plan.tpd is None else plan.tpd
        args += [name, plan.rpm, plan.rpd, tpm, tpd, 1 if plan.shadow else 0]
    return args


class Settled(NamedTuple):
    """What settle.lua did: whether this settlement was new, and the credits it charged."""

    new: bool
    charged: int


class Limiter:
    def __init__(
        self,
        client: ScriptClient,
        scripts: Scripts,
        plans: Mapping[str, Plan],
        metrics: Metrics,
        request_price: int = 1,
        retention_days: int = 90,
    ) -> None:
        self.client = client
        self.plan_args = plan_args(plans)
        self.metrics = metrics
        self.request_price = request_price
        noscript = metrics.redis_error["noscript"].inc
        fixed = [request_price, retention_days, *self.plan_args]  # admit.lua's ARGV[4...]
        self._admit = scripts.admit.bind(client, fixed, noscript)
        self._refund = scripts.refund.bind(client, (request_price, retention_days), noscript)
        self._settle = scripts.settle.bind(client, (retention_days,), noscript)

    async def admit(self, key: ParsedKey, route: str, model: str = MODEL_NOT_READ) -> Decision:
        """One admission for `key` on `route` (the path after /v1/); `model` as `model_state`
        gives it when the body was read, else MODEL_NOT_READ."""
        try:
            reply = await self._admit(admit_keys(key.kid), (key.hash, route, model))
        except RedisUnavailable as exc:
            self.metrics.redis_error[exc.kind].inc()
            raise
        return decode(reply)

    async def refund(self, kid: str) -> None:
        """Give back the request price of an admitted request the upstream never received."""
        try:
            await self._refund((record_key(kid),), ())
        except RedisUnavailable as exc:
            self.metrics.redis_error[exc.kind].inc()
            raise

    def settle_now(
        self, kid: str, settlement: str, tokens_in: int, tokens_out: int, cost_micros: int,
        tpm: int, tpd: int, remember_s: int = 3600,
    ) -> asyncio.Future[Any] | None:  # fmt: skip
        """`settle`, sent at once as a bare reply future on the request path's own client (no
        coroutine, no task); None when that is not possible: then await `settle`."""
        return self._settle.now(
            settle_keys(kid, settlement),
            (tokens_in, tokens_out, cost_micros, tpm, tpd, remember_s),
        )

    async def settle(
        self, kid: str, settlement: str, tokens_in: int, tokens_out: int, cost_micros: int,
        tpm: int, tpd: int, remember_s: int = 3600,
    ) -> Settled:  # fmt: skip
        """Charge one metered request's usage (settle.lua), once per `settlement` id."""
        try:
            reply = await self._settle(
                settle_keys(kid, settlement),
                (tokens_in, tokens_out, cost_micros, tpm, tpd, remember_s),
            )
        except RedisUnavailable as exc:
            self.metrics.redis_error[exc.kind].inc()
            raise
        return Settled(int(reply[0]) == 1, int(reply[1]) if len(reply) > 1 else 0)


def go_duration(ms: int) -> bytes:
    """A duration the way OpenAI's `x-ratelimit-reset-*` headers write it: 20ms, 1.5s, 6m0s."""
    if ms < 1000:
        return b"%dms" % max(ms, 0)
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = (b"%d.%03d" % divmod(rest, 1000)).rstrip(b"0").rstrip(b".")
    if hours:
        return b"%dh%dm%ss" % (hours, minutes, seconds)
    if minutes:
        return b"%dm%ss" % (minutes, seconds)
    return seconds + b"s"


def ceil_seconds(ms: int) -> int:
    return -(-ms // 1000)


@lru_cache(maxsize=1024)
def policy_header(rpm: int, rpd: int, tpm: int = NO_LIMIT, tpd: int = NO_LIMIT) -> bytes:
    policy = b'"minute";q=%d;w=60, "day";q=%d;w=86400' % (rpm, rpd)
    if tpm != NO_LIMIT:
        policy += b', "tokens-minute";q=%d;w=60' % tpm
    if tpd != NO_LIMIT:
        policy += b', "tokens-day";q=%d;w=86400' % tpd
    return policy


def rate_limit_headers(d: Decision) -> Headers:
    """OpenAI's x-ratelimit-* (minute window) and the IETF RateLimit fields (both windows); for
    a key with token limits, OpenAI's token headers (minute) and the token windows too."""
    state = b'"minute";r=%d;t=%d, "day";r=%d;t=%d' % (
        d.minute_remaining,
        ceil_seconds(d.minute_reset_ms),
        d.day_remaining,
        ceil_seconds(d.day_reset_ms),
    )
    if d.tpm == NO_LIMIT and d.tpd == NO_LIMIT:  # the common case, in one list
        return [
            (b"x-ratelimit-limit-requests", b"%d" % d.rpm),
            (b"x-ratelimit-remaining-requests", b"%d" % d.minute_remaining),
            (b"x-ratelimit-reset-requests", go_duration(d.minute_reset_ms)),
            (b"ratelimit-policy", policy_header(d.rpm, d.rpd)),
            (b"ratelimit", state),
        ]
    headers = [
        (b"x-ratelimit-limit-requests", b"%d" % d.rpm),
        (b"x-ratelimit-remaining-requests", b"%d" % d.minute_remaining),
        (b"x-ratelimit-reset-requests", go_duration(d.minute_reset_ms)),
    ]
    if d.tpm != NO_LIMIT:
        headers += [
            (b"x-ratelimit-limit-tokens", b"%d" % d.tpm),
            (b"x-ratelimit-remaining-tokens", b"%d" % max(0, d.tokens_minute)),
            (b"x-ratelimit-reset-tokens", go_duration(d.tokens_minute_reset_ms)),
        ]
        state += b', "tokens-minute";r=%d;t=%d' % (
            max(0, d.tokens_minute),
            ceil_seconds(d.tokens_minute_reset_ms),
        )
    if d.tpd != NO_LIMIT:
        state += b', "tokens-day";r=%d;t=%d' % (
            max(0, d.tokens_day),
            ceil_seconds(d.tokens_day_reset_ms),
        )
    headers += [
        (b"ratelimit-policy", policy_header(d.rpm, d.rpd, d.tpm, d.tpd)),
        (b"ratelimit", state),
    ]
    return headers


def rejection_headers(d: Decision) -> Headers:
    """Rate-limit headers plus `Retry-After` (whole seconds, at least 1) for a 429.

    A day-window rejection also says `x-should-retry: false`, so SDKs that honour it (OpenAI's
    do) stop retrying instead of burning their retries on a wait that long.
    """
    headers = rate_limit_headers(d)
    headers.append((b"retry-after", b"%d" % max(1, ceil_seconds(d.retry_ms))))
    if d.code in (Code.DAY_EMPTY, Code.TOKENS_DAY_EMPTY):
        headers.append((b"x-should-retry", b"false"))
    return headers


class Rejection(NamedTuple):
    """What a request that was not admitted gets, and how it is counted."""

    error: errors.EdgeError
    outcome: str  # edge_requests_total's outcome label
    known: bool  # counted under the record's plan; False: under "none" (no such key)
    headers: Headers


WINDOW_NAMES = {
    Code.MINUTE_EMPTY: "per min (RPM)",
    Code.DAY_EMPTY: "per day (RPD)",
    Code.TOKENS_MINUTE_EMPTY: "per min (TPM)",
    Code.TOKENS_DAY_EMPTY: "per day (TPD)",
}


def rejection(d: Decision, route: str = "", model: str | None = None) -> Rejection:
    """The answer to a decision other than an admission. Wording follows OpenAI's (errors.py);
    `route` and `model` (when the body was read) name what a key's scopes do not allow."""
    code = d.code
    err: errors.EdgeError
    if code in (Code.MINUTE_EMPTY, Code.DAY_EMPTY):
        window = "minute" if code == Code.MINUTE_EMPTY else "day"
        limit = d.rpm if code == Code.MINUTE_EMPTY else d.rpd
        headers = rejection_headers(d)
        wait = go_duration(max(1000, ceil_seconds(d.retry_ms) * 1000)).decode()
        err = errors.RateLimited(
            f"Rate limit reached for this API key on requests {WINDOW_NAMES[code]}: Limit "
            f"{limit}, Requested 1. Please try again in {wait}."
        )
        return Rejection(err, f"rate_limited_{window}", True, headers)
    if code in (Code.TOKENS_MINUTE_EMPTY, Code.TOKENS_DAY_EMPTY):
        minute = code == Code.TOKENS_MINUTE_EMPTY
        limit, left = (d.tpm, d.tokens_minute) if minute else (d.tpd, d.tokens_day)
        wait = go_duration(max(1000, ceil_seconds(d.retry_ms) * 1000)).decode()
        err = errors.RateLimited(
            f"Rate limit reached for this API key on tokens {WINDOW_NAMES[code]}: Limit "
            f"{limit}, Used {limit - left}. Please try again in {wait}."
        )
        outcome = "rate_limited_tokens_minute" if minute else "rate_limited_tokens_day"
        return Rejection(err, outcome, True, rejection_headers(d))
    if code == Code.OUT_OF_SCOPE:
        what = "this endpoint or model"  # the scopes themselves are unreadable: nothing is
        if d.rpm == OUT_OF_SCOPE_ROUTE:
            what = f"the route `{route}`"
        elif d.rpm == OUT_OF_SCOPE_MODEL:
            what = f"the model `{model}`" if model else "this model"
        err = errors.PermissionDenied(
            f"This API key may not use {what}: you have insufficient permissions for this "
            "operation."
        )
        return Rejection(err, "forbidden", True, [])
    if code == Code.NO_CREDITS:
        err = errors.InsufficientBalance(
            f"You exceeded your current quota: this API key's balance is {d.credits:,} "
            "credits. Ask for a top-up to continue."
        )
        return Rejection(err, "insufficient_balance", True, [])
    if code in (Code.MODEL_UNREADABLE, Code.NEED_MODEL):
        err = errors.BadRequest(
            "This API key may use only some models, so the request body must be a JSON object "
            'with a string "model" field.',
            code="invalid_body",
            param="model",
        )
        return Rejection(err, "bad_request", True, [])
    if code == Code.PAUSED:
        err = errors.PermissionDenied(
            "This API key is paused: you have insufficient permissions for this operation "
            "until it is resumed."
        )
        return Rejection(err, "forbidden", True, [])
    if code == Code.PLAN_MISSING:
        err = errors.ServiceUnavailable(
            "This API key's plan is not configured on this server.", code="config_error"
        )
        return Rejection(err, "unavailable", True, [])
    if code == Code.EXPIRED:
        err = errors.InvalidApiKey("Incorrect API key provided: this API key has expired.")
        return Rejection(err, "unauthorized", True, [])
    if code == Code.REVOKED:
        err = errors.InvalidApiKey("Incorrect API key provided: this API key has been revoked.")
        return Rejection(err, "unauthorized", True, [])
    return Rejection(errors.InvalidApiKey(), "unauthorized", False, [])
