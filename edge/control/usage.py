"""Per-key usage history as operators read it: rows per UTC day or hour, summed over keys.

The scripts on the request path write it (admit.lua, settle.lua, refund.lua, through
`lua/include/usage.lua`): per key, a hash per UTC day (`<record>:day:YYYY-MM-DD`, kept
`usage.retention_days`) and per UTC hour (`<record>:hour:YYYY-MM-DDTHH`, kept 48 hours).
Reading costs one pipelined round trip per batch of (key, period) pairs; a period nobody used is a
row of zeros, so a chart has no gaps.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from redis import exceptions as rex

from edge.keys import usage_day_key, usage_hour_key
from edge.redis.failures import redis_errors
from edge.redis.types import StoreClient

FIELDS = ("requests", "rate_limited", "rejected", "input_tokens", "output_tokens", "credits")
HOURS_KEPT = 48  # include/usage.lua's USAGE_HOURS
MAX_DAY_ROWS = 366
MAX_HOUR_ROWS = 7 * 24
BATCH = 2000  # commands per pipeline
Granularity = Literal["day", "hour"]
Row = dict[str, Any]


@dataclass(frozen=True)
class Period:
    start: datetime  # UTC
    suffix: str  # the date or hour in the Redis key name

    @property
    def label(self) -> str:
        return self.start.strftime("%Y-%m-%dT%H:%M:%SZ")


def periods(first: date, last: date, granularity: Granularity) -> list[Period]:
    """Every day (or every hour of every day) from `first` to `last`, both included."""
    out = []
    day = first
    while day <= last:
        midnight = datetime(day.year, day.month, day.day, tzinfo=UTC)
        if granularity == "day":
            out.append(Period(midnight, day.isoformat()))
        else:
            for hour in range(24):
                moment = midnight + timedelta(hours=hour)
                out.append(Period(moment, moment.strftime("%Y-%m-%dT%H")))
        day += timedelta(days=1)
    return out


COUNT = re.compile(rb"-?[0-9]{1,19}")
LOWEST, HIGHEST = -(2**63), 2**63 - 1


def _count(value: Any) -> int:
    """A field as the scripts keep it: a whole number Redis can add to (64-bit, maybe negative
    for refunded credits, no spaces or underscores); anything else reads as 0, as HINCRBY
    would find it (and the scripts start it again)."""
    if isinstance(value, str):
        value = value.encode("ascii", "replace")
    if not isinstance(value, bytes) or not COUNT.fullmatch(value):
        return 0
    number = int(value)
    return number if LOWEST <= number <= HIGHEST else 0


def row(period: Period, raw: dict[Any, Any]) -> Row:
    fields = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
    return {"start": period.label, **{name: _count(fields.get(name)) for name in FIELDS}}


def total(rows: Sequence[Row]) -> Row:
    return {name: sum(r[name] for r in rows) for name in FIELDS}


def summed(per_key: Sequence[Sequence[Row]]) -> list[Row]:
    """Rows of several keys over the same periods, added period by period."""
    if not per_key:
        return []
    return [{"start": rows[0]["start"], **total(rows)} for rows in zip(*per_key, strict=True)]


def zeros(first: date, last: date, granularity: Granularity) -> list[Row]:
    """The rows of no keys at all."""
    return [row(p, {}) for p in periods(first, last, granularity)]


class UsageHistory:
    def __init__(self, client: StoreClient) -> None:
        self.client = client

    async def now(self) -> datetime:
        """Redis time (the clock the scripts count by), in UTC."""
        with redis_errors("reading Redis time"):
            seconds, _ = await self.client.time()
        return datetime.fromtimestamp(int(seconds), UTC)

    async def today(self) -> date:
        return (await self.now()).date()

    async def last_hours(self, kid: str, hours: int = HOURS_KEPT) -> list[Row]:
        """The key's rows for the last `hours` hours, this one included."""
        now = await self.now()
        first = (now - timedelta(hours=hours - 1)).date()
        [rows] = await self.of_keys([kid], first, now.date(), "hour")
        label = now.strftime("%Y-%m-%dT%H:00:00Z")
        return [r for r in rows if r["start"] <= label][-hours:]

    async def of_keys(
        self, kids: Sequence[str], first: date, last: date, granularity: Granularity
    ) -> list[list[Row]]:
        """Each key's rows over the periods from `first` to `last`, zeros where none."""
        spans = periods(first, last, granularity)
        name = usage_day_key if granularity == "day" else usage_hour_key
        wanted = [(kid, p) for kid in kids for p in spans]
        replies: list[Any] = []
        with redis_errors("reading usage history"):
            for at in range(0, len(wanted), BATCH):
                pipe = self.client.pipeline(transaction=False)
                for kid, p in wanted[at : at + BATCH]:
                    pipe.hgetall(name(kid, p.suffix))
                replies += await pipe.execute(raise_on_error=False)
            for reply in replies:
                if isinstance(reply, Exception) and not isinstance(reply, rex.ResponseError):
                    raise reply  # Redis away: the caller's 503
        # a key of another type at a usage name (WRONGTYPE): the scripts leave it alone, and
        # so does reading: no usage there
        rows = [
            row(p, raw if isinstance(raw, dict) else {})
            for (_, p), raw in zip(wanted, replies, strict=True)
        ]
        return [rows[i : i + len(spans)] for i in range(0, len(rows), len(spans))]
