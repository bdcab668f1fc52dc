"""Leaked-key reports (`POST /admin/leaks`): GitHub-style secret scanning finds strings shaped
like edge's keys in public code and hands them to the issuer, who checks and revokes them.

Each candidate is checked as a request would be (format and checksum, no I/O; then its hash
against the record's current secret, or its previous one during a rotation's grace). A real
one is revoked at once (`keys.revoke_leaked`): the key, or, when only the previous secret
leaked, that secret's grace (the current secret was not in the leak). The answer says only
"revoked", "found" (revoking is off) or "not_a_key", never whose key or why not: the endpoint
must not help anyone test guesses, and it is rate-limited besides. Each real key found is
audited with the report's source.
"""

from __future__ import annotations

import hmac
import time
from collections import deque

from edge.control.store import KeyStore
from edge.errors import RateLimited
from edge.keys import KeyFormat, key_hash, record_key
from edge.redis.failures import redis_errors

CALLS_PER_MINUTE = 10


class CallLimit:
    """At most `per_minute` calls in any 60 s, in this process."""

    def __init__(self, per_minute: int = CALLS_PER_MINUTE) -> None:
        self.per_minute = per_minute
        self.calls: deque[float] = deque()

    def check(self) -> None:
        now = time.monotonic()
        while self.calls and self.calls[0] <= now - 60:
            self.calls.popleft()
        if len(self.calls) >= self.per_minute:
            wait = int(self.calls[0] + 60 - now) + 1
            raise RateLimited(
                f"Rate limit reached for leak reports: {self.per_minute} per minute. "
                f"Please try again in {wait}s."
            )
        self.calls.append(now)


async def check_leaks(
    store: KeyStore, candidates: list[str], source: str, actor: str
) -> list[dict[str, str]]:
    """Each candidate's status, in order (see the module's docstring)."""
    revoke = store.settings.keys.revoke_leaked
    fmt = KeyFormat(store.settings.keys.prefix)
    out = []
    for candidate in candidates:
        parsed = fmt.parse(candidate.encode("utf-8", "surrogatepass"))
        status = "not_a_key"
        if parsed is not None:
            status = await _one(store, parsed.kid, candidate, source, actor, revoke)
        out.append({"status": status})
    return out


async def _one(store: KeyStore, kid: str, key: str, source: str, actor: str, revoke: bool) -> str:
    record = record_key(kid)
    with redis_errors("checking a leaked key"):
        current, previous, until, state, owner = await store.client.hmget(
            record, "hash", "prev_hash", "prev_until", "status", "owner"
        )
        seconds, _ = await store.client.time()
    digest = key_hash(key).encode()
    text = [v.decode() if isinstance(v, bytes) else v for v in (state, owner, until)]
    is_current = current is not None and hmac.compare_digest(_bytes(current), digest)
    in_grace = text[2] is not None and text[2].isdigit() and int(seconds) < int(text[2])
    is_previous = (
        previous is not None and in_grace and hmac.compare_digest(_bytes(previous), digest)
    )
    if not (is_current or is_previous):
        return "not_a_key"
    changes = {"source": source, "secret": "current" if is_current else "previous"}
    if text[0] == "revoked":
        await store.audit.record("leak", kid, text[1] or "", actor, {**changes, "revoked": True})
        return "revoked"
    if not revoke:
        await store.audit.record("leak", kid, text[1] or "", actor, {**changes, "revoked": False})
        return "found"
    if is_current:
        await store.set_status(kid, "revoked", f"{actor} (leak report)")
    else:
        await store.end_grace(kid, f"{actor} (leak report)")
    await store.audit.record("leak", kid, text[1] or "", actor, {**changes, "revoked": True})
    return "revoked"


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
