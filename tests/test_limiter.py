"""edge/proxy/admission.py: decoding admit.lua's reply and the rate-limit headers. No I/O."""

from __future__ import annotations

from edge import errors
from edge.proxy.admission import (
    Code,
    Decision,
    decode,
    go_duration,
    plan_args,
    rate_limit_headers,
    rejection,
    rejection_headers,
)
from edge.redis.buckets import bucket_used
from edge.settings import Plan


def test_decode_full_and_short_replies() -> None:
    d = decode([0, b"free", 20, 1000, 19, 3000, 999, 86400, 0, 41, 1, 1900000000])
    assert d == Decision(
        Code.ADMITTED, "free", 20, 1000, 19, 3000, 999, 86400, 0, 41, 1, 1900000000
    )
    assert d.model_scoped and d.expires == 1900000000
    routes_only = decode([8, b"free", 0, 0, 0, 0, 0, 0, 0, 0, 2, 0])
    assert not routes_only.has_balance and not routes_only.model_scoped
    metered = decode([0, b"pro", 200, 50000, 199, 300, 49999, 1728, 0, -7, 4, 0, 1000, -1, -50])
    assert metered.has_balance and metered.credits == -7 and metered.token_limited
    assert (metered.tpm, metered.tpd, metered.tokens_minute) == (1000, -1, -50)
    assert decode([1]) == Decision(Code.UNKNOWN, "")
    assert decode([4, b"pro"]).plan == "pro"


def test_plan_args_flatten_the_table() -> None:
    table = {"free": Plan(rpm=20, rpd=1000), "pro": Plan(rpm=200, rpd=50000, tpm=9000)}
    assert plan_args(table) == ["free", 20, 1000, -1, -1, 0, "pro", 200, 50000, 9000, -1, 0]


def test_go_duration_matches_openai_style() -> None:
    assert go_duration(0) == b"0ms"
    assert go_duration(20) == b"20ms"
    assert go_duration(1000) == b"1s"
    assert go_duration(1500) == b"1.5s"
    assert go_duration(8640) == b"8.64s"
    assert go_duration(60_000) == b"1m0s"
    assert go_duration(90_500) == b"1m30.5s"
    assert go_duration(3_600_000) == b"1h0m0s"


def test_headers_of_an_admitted_request() -> None:
    d = Decision(Code.ADMITTED, "free", 20, 1000, 19, 3000, 999, 86_400, 0)
    h = dict(rate_limit_headers(d))
    assert h[b"x-ratelimit-limit-requests"] == b"20"
    assert h[b"x-ratelimit-remaining-requests"] == b"19"
    assert h[b"x-ratelimit-reset-requests"] == b"3s"
    assert h[b"ratelimit-policy"] == b'"minute";q=20;w=60, "day";q=1000;w=86400'
    assert h[b"ratelimit"] == b'"minute";r=19;t=3, "day";r=999;t=87'
    assert b"retry-after" not in h


def test_retry_after_is_a_whole_number_of_seconds_at_least_one() -> None:
    minute = Decision(Code.MINUTE_EMPTY, "free", 20, 1000, 0, 60_000, 900, 8_000_000, 1)
    h = dict(rejection_headers(minute))
    assert h[b"retry-after"] == b"1"
    assert b"x-should-retry" not in h
    minute = minute._replace(retry_ms=2_001)
    assert dict(rejection_headers(minute))[b"retry-after"] == b"3"


def test_day_rejection_tells_sdks_not_to_retry() -> None:
    day = Decision(Code.DAY_EMPTY, "free", 20, 1000, 19, 3000, 0, 86_400_000, 86_400)
    h = dict(rejection_headers(day))
    assert h[b"retry-after"] == b"87"
    assert h[b"x-should-retry"] == b"false"


def test_rejections_map_to_error_outcome_and_headers() -> None:
    """`Decision → (error, outcome, headers)`, one row per code that is not an admission."""
    minute = Decision(Code.MINUTE_EMPTY, "free", 20, 1000, 0, 60_000, 900, 8_000_000, 2_500)
    day = Decision(Code.DAY_EMPTY, "free", 20, 1000, 19, 3000, 0, 86_400_000, 86_400)
    table = [
        (Decision(Code.UNKNOWN, ""), errors.InvalidApiKey, "unauthorized", False),
        (Decision(Code.REVOKED, "free"), errors.InvalidApiKey, "unauthorized", True),
        (Decision(Code.EXPIRED, "free"), errors.InvalidApiKey, "unauthorized", True),
        (Decision(Code.PAUSED, "free"), errors.PermissionDenied, "forbidden", True),
        (Decision(Code.PLAN_MISSING, "gold"), errors.ServiceUnavailable, "unavailable", True),
        (minute, errors.RateLimited, "rate_limited_minute", True),
        (day, errors.RateLimited, "rate_limited_day", True),
    ]
    for decision, kind, outcome, known in table:
        answer = rejection(decision)
        assert type(answer.error) is kind, decision
        assert (answer.outcome, answer.known) == (outcome, known), decision
        assert bool(answer.headers) == (kind is errors.RateLimited)
    assert "expired" in rejection(table[2][0]).error.message
    assert "revoked" in rejection(table[1][0]).error.message
    minute_answer = rejection(minute)
    assert "per min (RPM): Limit 20" in minute_answer.error.message
    assert "try again in 3s" in minute_answer.error.message
    assert dict(minute_answer.headers)[b"retry-after"] == b"3"
    assert "per day (RPD): Limit 1000" in rejection(day).error.message
    assert rejection(Decision(Code.PLAN_MISSING, "gold")).error.code == "config_error"


def test_bucket_used_reads_the_bucket_as_admit_lua_does() -> None:
    day = 86_400_000
    now = 10_000_000
    assert bucket_used(1000, None, None, now, day) == 0  # no bucket: full
    assert bucket_used(1000, 997.0, now, now, day) == 3
    assert bucket_used(1000, 997.0, now - 100, now, day) == 3  # a hair of refill: still 3
    assert bucket_used(1000, 997.0, now - 86_400, now, day) == 2  # one request's refill
    assert bucket_used(1000, 0.0, now - day, now, day) == 0  # a whole day: full again
    assert bucket_used(1000, -5.0, now, now, day) == 1000
    assert bucket_used(1000, float("nan"), now, now, day) == 0
    assert bucket_used(0, 0.0, now, now, day) == 0
    assert bucket_used(10, 5.0, now + day * 5, now, day) == 5  # future stamp: no refill


def test_headers_of_a_key_with_token_limits() -> None:
    d = Decision(Code.ADMITTED, "pro", 200, 50_000, 199, 300, 49_999, 1_728, 0, 0, 0, 0,
                 30_000, 1_000_000, -120, 61_000, 999_000, 86_400_000)  # fmt: skip
    h = dict(rate_limit_headers(d))
    assert h[b"x-ratelimit-limit-tokens"] == b"30000"
    assert h[b"x-ratelimit-remaining-tokens"] == b"0"  # in debt: nothing left, not negative
    assert h[b"x-ratelimit-reset-tokens"] == b"1m1s"
    assert h[b"ratelimit-policy"] == (
        b'"minute";q=200;w=60, "day";q=50000;w=86400, "tokens-minute";q=30000;w=60, '
        b'"tokens-day";q=1000000;w=86400'
    )
    assert h[b"ratelimit"].endswith(b'"tokens-minute";r=0;t=61, "tokens-day";r=999000;t=86400')


def test_a_token_429_says_which_window_in_openais_words() -> None:
    d = Decision(Code.TOKENS_MINUTE_EMPTY, "pro", 200, 50_000, 199, 300, 49_999, 1_728, 2_500,
                 0, 0, 0, 30_000, -1, -2_000, 64_000)  # fmt: skip
    answer = rejection(d)
    assert answer.outcome == "rate_limited_tokens_minute"
    assert "on tokens per min (TPM): Limit 30000, Used 32000" in answer.error.message
    assert dict(answer.headers)[b"retry-after"] == b"3"
    day = rejection(d._replace(code=Code.TOKENS_DAY_EMPTY, tpd=100, tokens_day=0))
    assert day.outcome == "rate_limited_tokens_day"
    assert (b"x-should-retry", b"false") in day.headers
