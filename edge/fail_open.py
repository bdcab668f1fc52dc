"""The fail-open policy (`redis.fail_open`): what edge may still admit while Redis is away.

Never an unknown key: only a key this instance itself validated (its SHA-256 matched, it was
active and unexpired) within the last `redis.fail_open_auth_ttl` seconds, remembered in a
bounded in-process table of key hashes (never plaintext keys). A key with scopes or a credit
balance is never admitted this way: its per-request checks need Redis. A key seen paused,
revoked, expired or unknown is forgotten at once. Each admission this way is counted
(`edge_fail_open_admissions_total{plan}`) and logged, throttled; it charges nothing, since the
buckets live in Redis. Fail-closed stays the default.
"""

from __future__ import annotations

import time
from typing import NamedTuple

from edge.keys import ParsedKey
from edge.limiter import UNLIMITED, Code, Decision

VALID = (Code.ADMITTED, Code.MINUTE_EMPTY, Code.DAY_EMPTY)  # the key itself checked out
GONE = (Code.REVOKED, Code.EXPIRED, Code.PAUSED, Code.PLAN_MISSING)


class Validated(NamedTuple):
    hash: str
    decision: Decision  # the last one Redis gave: plan, limits, expiry
    at: float  # monotonic seconds


class FailOpen:
    def __init__(self, ttl: float, size: int = 100_000) -> None:
        self.ttl = ttl
        self.size = size
        self._seen: dict[str, Validated] = {}

    def note(self, key: ParsedKey, decision: Decision) -> None:
        """Learn from one of Redis's answers about `key`."""
        known = self._seen.get(key.kid)
        if decision.code in VALID:
            if decision.scopes or decision.credits != UNLIMITED:
                self._seen.pop(key.kid, None)
                return
            if known is None and len(self._seen) >= self.size:
                del self._seen[next(iter(self._seen))]  # the oldest
            self._seen[key.kid] = Validated(key.hash, decision, time.monotonic())
        elif known is not None and (decision.code in GONE or known.hash == key.hash):
            del self._seen[key.kid]

    def admit(self, key: ParsedKey) -> Decision | None:
        """An admission for `key` without Redis, or None (then: fail closed)."""
        known = self._seen.get(key.kid)
        if known is None or known.hash != key.hash:
            return None
        if time.monotonic() - known.at > self.ttl:
            del self._seen[key.kid]
            return None
        expires = known.decision.expires
        if expires and time.time() >= expires:  # Redis time is not to be had: ours will do
            return None
        return known.decision._replace(code=Code.ADMITTED, retry_ms=0)
