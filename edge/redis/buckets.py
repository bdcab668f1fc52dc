"""Token buckets as admit.lua keeps them (hash fields `tokens` and `ts`), read back in Python.
Pure, no I/O: the control plane shows a key's use of its day window from a bucket it read.
"""

from __future__ import annotations

import math

DAY_MS = 86_400_000


def bucket_used(cap: int, tokens: float | None, ts: float | None, now_ms: int, window: int) -> int:
    """Whole requests a bucket holds back right now (capacity minus its level), read as
    admit.lua reads it: a missing or unreadable bucket is full, refill is continuous."""
    if cap <= 0 or tokens is None or ts is None or tokens != tokens or ts != ts:
        return 0
    level = min(max(tokens, 0.0), cap)
    if now_ms > ts:
        level = min(cap, level + (now_ms - min(ts, now_ms + window)) * cap / window)
    return max(0, min(cap, math.ceil(cap - level - 1e-9)))
