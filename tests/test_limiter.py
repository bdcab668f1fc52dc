"""edge/limiter.py: decoding admit.lua's reply and the rate-limit headers. No I/O."""

from __future__ import annotations

from edge.limiter import (
    ADMITTED,
    DAY_EMPTY,
    MINUTE_EMPTY,
    UNKNOWN,
    Decision,
    decode,
    go_duration,
    plan_args,
    rate_limit_headers,
    rejection_headers,
)
from edge.settings import Plan


def test_decode_full_and_short_replies() -> None:
    d = decode([0, b"free", 20, 1000, 19, 3000, 999, 86400, 0])
    assert d == Decision(ADMITTED, "free", 20, 1000, 19, 3000, 999, 86400, 0)
    assert decode([1]) == Decision(UNKNOWN, "")
    assert decode([4, b"pro"]).plan == "pro"


def test_plan_args_flatten_the_table() -> None:
    assert plan_args({"free": Plan(20, 1000), "pro": Plan(200, 50000)}) == [
        "free",
        20,
        1000,
        "pro",
        200,
        50000,
    ]


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
    d = Decision(ADMITTED, "free", 20, 1000, 19, 3000, 999, 86_400, 0)
    h = dict(rate_limit_headers(d))
    assert h[b"x-ratelimit-limit-requests"] == b"20"
    assert h[b"x-ratelimit-remaining-requests"] == b"19"
    assert h[b"x-ratelimit-reset-requests"] == b"3s"
    assert h[b"ratelimit-policy"] == b'"minute";q=20;w=60, "day";q=1000;w=86400'
    assert h[b"ratelimit"] == b'"minute";r=19;t=3, "day";r=999;t=87'
    assert b"retry-after" not in h


def test_retry_after_is_a_whole_number_of_seconds_at_least_one() -> None:
    minute = Decision(MINUTE_EMPTY, "free", 20, 1000, 0, 60_000, 900, 8_000_000, 1)
    h = dict(rejection_headers(minute))
    assert h[b"retry-after"] == b"1"
    assert b"x-should-retry" not in h
    minute = minute._replace(retry_ms=2_001)
    assert dict(rejection_headers(minute))[b"retry-after"] == b"3"


def test_day_rejection_tells_sdks_not_to_retry() -> None:
    day = Decision(DAY_EMPTY, "free", 20, 1000, 19, 3000, 0, 86_400_000, 86_400)
    h = dict(rejection_headers(day))
    assert h[b"retry-after"] == b"87"
    assert h[b"x-should-retry"] == b"false"
