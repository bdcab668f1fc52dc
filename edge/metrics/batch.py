"""The request path's metric updates as plain Python numbers, moved into prometheus-client's
objects in batches.

Why: each `inc()` or `observe()` of prometheus-client takes a lock (and, with `--workers`,
writes a memory-mapped file); a /v1 request makes about eight of them, 4.8 % of edge's CPU
samples under load (`benchmarks/profile_edge.py`, 32 connections). Here a request adds to an
int or a bucket count; `flush()` hands the sums over. Metrics calls it before every
exposition, at shutdown, and (with `--workers`, where other workers read the files) every
`FLUSH_EVERY` seconds, so a scrape is never more than that behind a request.

Histogram observations are handed over per bucket through prometheus-client's `_buckets` and
`_sum` values, its own storage; `supports_batches` checks they are there at start-up, and
without them (a future prometheus-client) each observation is replayed through `observe()`.
tests/test_metric_batch.py holds a batched histogram's exposition equal to a direct one's.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

FLUSH_EVERY = 0.1  # seconds, with --workers


class Tally:
    """A counter (or gauge) child's increments since the last flush."""

    __slots__ = ("child", "n")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.n: float = 0

    def inc(self, amount: float = 1) -> None:
        self.n += amount

    def flush(self) -> None:
        if self.n:
            n, self.n = self.n, 0
            self.child.inc(n)


class Observations:
    """A histogram child's observations since the last flush: a count per bucket and a sum."""

    __slots__ = ("batched", "bounds", "child", "counts", "seen", "sum")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds: tuple[float, ...] = tuple(child._upper_bounds)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.seen: list[float] = []  # only without batch support: the values themselves
        self.batched = supports_batches(child)

    def observe(self, value: float) -> None:
        # prometheus counts a value in the first bucket whose bound is >= it: bisect_left
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        if not self.batched:
            self.seen.append(value)

    def flush(self) -> None:
        if not self.batched:
            seen, self.seen = self.seen, []
            for value in seen:
                self.child.observe(value)
            self.counts = [0] * len(self.bounds)
            self.sum = 0.0
            return
        counts = self.counts
        if not any(counts):
            return
        self.counts = [0] * len(self.bounds)
        total, self.sum = self.sum, 0.0
        buckets = self.child._buckets
        for i, n in enumerate(counts):
            if n:
                buckets[i].inc(n)
        self.child._sum.inc(total)


def supports_batches(child: Any) -> bool:
    """Whether a histogram child keeps per-bucket values and a sum the way batches need."""
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    bounds = getattr(child, "_upper_bounds", None)
    return (
        isinstance(buckets, list)
        and isinstance(bounds, list)
        and len(buckets) == len(bounds)
        and all(hasattr(b, "inc") for b in buckets)
        and hasattr(total, "inc")
    )


class Level:
    """A gauge's level (requests in flight), set on the gauge when it has changed."""

    __slots__ = ("gauge", "n", "shown")

    def __init__(self, gauge: Any) -> None:
        self.gauge = gauge
        self.n = 0
        self.shown = 0

    def inc(self) -> None:
        self.n += 1

    def dec(self) -> None:
        self.n -= 1

    def flush(self) -> None:
        if self.n != self.shown:
            self.shown = self.n
            self.gauge.set(self.n)
