"""The fail-open policy (`redis.fail_open`): what edge may still admit while Redis is away.

Never an unknown key: only a key this instance itself validated (its SHA-256 matched, it was
active and unexpired) within the last `redis.fail_open_auth_ttl` seconds, remembered in a
bounded in-process table of key hashes (never plaintext keys). A key with scopes or a credit
balance is never admitted this way: its per-request checks need Redis. A key seen paused,
revoked, expired or unknown is forgotten at once. Each admission this way is counted
(`edge_fail_open_admissions_total{plan}`) and logged, throttled; it charges nothing, since the
buckets live in Redis. Fail-closed stays the default.

A change made through this instance's admin API (revoke, pause, rotate, any update) drops the
key at once (`forget`), in every worker process: the workers of one `edge serve --workers N`
share an append-only file of changed kids in the supervisor's directory, read only when an
admission is about to be made without Redis. A change made through another instance, or the
CLI, cannot be known while Redis is away: that is the policy's trade-off.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NamedTuple

from edge.keys import ParsedKey
from edge.proxy.admission import Code, Decision

# the key itself checked out (admitted, in shadow too, or only out of requests for now)
VALID = (
    Code.ADMITTED, Code.MINUTE_EMPTY, Code.DAY_EMPTY,
    Code.SHADOW_MINUTE, Code.SHADOW_DAY, Code.SHADOW_TOKENS_MINUTE, Code.SHADOW_TOKENS_DAY,
)  # fmt: skip
GONE = (Code.REVOKED, Code.EXPIRED, Code.PAUSED, Code.PLAN_MISSING)


class Validated(NamedTuple):
    hash: str
    decision: Decision  # the last one Redis gave: plan, limits, expiry
    at: float  # monotonic seconds


class SharedChanges:
    """Kids changed through any worker of this instance: lines `<monotonic s> <kid>` appended
    to one file (CLOCK_MONOTONIC is one clock for every process of the machine), each reader
    taking what was added since it last looked."""

    NAME = "key-changes"

    def __init__(self, directory: str) -> None:
        self.path = Path(directory) / self.NAME
        self._offset = self._size()  # what was there before this process began is old news

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def add(self, kid: str, at: float) -> None:
        line = f"{at:.6f} {kid}\n".encode("ascii")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)  # one write of a short line with O_APPEND: never interleaved
        finally:
            os.close(fd)

    def since_last(self) -> list[tuple[float, str]]:
        size = self._size()
        if size <= self._offset:
            return []
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read(size - self._offset)
        whole = data.rfind(b"\n") + 1  # a line still being written is read next time
        self._offset += whole
        out = []
        for line in data[:whole].decode("ascii", "replace").splitlines():
            at, _, kid = line.partition(" ")
            try:
                out.append((float(at), kid))
            except ValueError:
                continue
        return out


class FailOpen:
    def __init__(self, ttl: float, size: int = 100_000, shared_dir: str | None = None) -> None:
        self.ttl = ttl
        self.size = size
        self._seen: dict[str, Validated] = {}
        self._shared = SharedChanges(shared_dir) if shared_dir else None

    def forget(self, kid: str) -> None:
        """The key was changed through this instance: nothing remembered about it holds."""
        self._seen.pop(kid, None)
        if self._shared is not None:
            self._shared.add(kid, time.monotonic())

    def _catch_up(self) -> None:
        """Forget what other workers of this instance were told since the last look."""
        assert self._shared is not None
        for at, kid in self._shared.since_last():
            known = self._seen.get(kid)
            if known is not None and known.at <= at:
                del self._seen[kid]

    def note(self, key: ParsedKey, decision: Decision) -> None:
        """Learn from one of Redis's answers about `key`."""
        known = self._seen.get(key.kid)
        if decision.code in VALID:
            if decision.scoped or decision.has_balance:
                self._seen.pop(key.kid, None)
                return
            if known is None and len(self._seen) >= self.size:
                del self._seen[next(iter(self._seen))]  # the oldest
            self._seen[key.kid] = Validated(key.hash, decision, time.monotonic())
        elif known is not None and (decision.code in GONE or known.hash == key.hash):
            del self._seen[key.kid]

    def admit(self, key: ParsedKey) -> Decision | None:
        """An admission for `key` without Redis, or None (then: fail closed)."""
        if self._shared is not None:
            self._catch_up()
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
