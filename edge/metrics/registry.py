"""Prometheus metrics, on a registry owned by one app (tests build many apps per process).

Names and labels are part of edge's surface (docs/metrics.md). No label carries a key id:
cardinality stays bounded by the plan table. Label children are bound once at start-up, so the hot
path does a dict lookup and an `inc()`, never a label resolution.

With `--workers N`, prometheus-client's multiprocess mode sums the workers: the supervisor
points `PROMETHEUS_MULTIPROC_DIR` at a directory it makes and removes, each worker's values
live in memory-mapped files there, and `/metrics` (whichever worker answers) reads them all.
Counters and histograms are summed; in-flight is summed over live workers only; plan limits
take the maximum (every worker has the same).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from edge.metrics.batch import FLUSH_EVERY, Level, Observations, Tally
from edge.settings import Plan

OUTCOMES = (
    "allowed",
    "rate_limited_minute",
    "rate_limited_day",
    "unauthorized",
    "forbidden",
    "insufficient_balance",
    "unavailable",
    "upstream_error",
    "bad_request",
    "upstream_cut",
    "rate_limited_tokens_minute",
    "rate_limited_tokens_day",
    "shadow_limited_minute",
    "shadow_limited_day",
    "shadow_limited_tokens_minute",
    "shadow_limited_tokens_day",
)
TOKEN_DIRECTIONS = ("input", "output")
TOKEN_SOURCES = ("reported", "estimated")
NO_PLAN = "none"
UNKNOWN_PLAN = "unconfigured"
REDIS_ERROR_KINDS = ("timeout", "connection", "noscript", "other")
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
ADMISSION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LIVE_GAUGE_FILE = re.compile(r"^gauge_live\w*?_(\d+)\.db$")


class Metrics:
    def __init__(self, plans: Mapping[str, Plan]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter(
            "edge_requests", "Requests to /v1 by plan and outcome", ["plan", "outcome"], registry=r
        )
        self.plan_limit = Gauge(
            "edge_plan_limit",
            "Configured requests per window",
            ["plan", "window"],
            registry=r,
            multiprocess_mode="max",
        )
        self.admission = Histogram(
            "edge_admission_seconds",
            "Request start to upstream request sent: edge's own overhead, Redis included",
            buckets=ADMISSION_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "edge_upstream_ttfb_seconds",
            "Upstream time to response headers",
            ["plan"],
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.upstream_responses = Counter(
            "edge_upstream_responses",
            "Upstream responses by upstream and status class",
            ["plan", "upstream", "status"],
            registry=r,
        )
        self.upstream_failovers = Counter(
            "edge_upstream_failovers",
            "Requests sent on to another upstream, and why (unreachable, or the status)",
            ["from", "to", "reason"],
            registry=r,
        )
        self.upstream_available = Gauge(
            "edge_upstream_available",
            "1 while an upstream takes traffic, 0 while its circuit breaker holds it out",
            ["upstream"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.inflight = Gauge(
            "edge_inflight_requests",
            "Requests being handled on /v1",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.redis_errors = Counter(
            "edge_redis_errors", "Redis failures by kind", ["kind"], registry=r
        )
        self.fail_open_admissions = Counter(
            "edge_fail_open_admissions",
            "Admissions made under redis.fail_open while Redis was unavailable",
            ["plan"],
            registry=r,
        )
        self.tokens = Counter(
            "edge_tokens",
            "LLM tokens metered keys used, as the upstream reported them or as estimated",
            ["plan", "direction", "source"],
            registry=r,
        )
        self.credits_charged = Counter(
            "edge_credits_charged",
            "Credits charged for LLM tokens (the request price is charged at admission)",
            ["plan"],
            registry=r,
        )
        self.settlement_failures = Counter(
            "edge_settlement_failures",
            "Settlements of metered requests that could not be written (their usage is lost)",
            registry=r,
        )

        # The request path's metrics, batched (metric_batch.py); the rest are rare. Label
        # children are bound per plan when the plan table is set (at start, and on a reload).
        self.outcome: dict[tuple[str, str], Tally] = {}
        self.ttfb_by_plan: dict[str, Observations] = {}
        self.status_by: dict[tuple[str, str, str], Tally] = {}
        self.fail_open: dict[str, Any] = {}
        self.tokens_by: dict[tuple[str, str, str], Tally] = {}
        self.credits_by_plan: dict[str, Tally] = {}
        self.admitted = Observations(self.admission)
        self.active = Level(self.inflight)
        self._batches: list[Tally | Observations | Level] = [self.admitted, self.active]
        self._flusher: asyncio.TimerHandle | None = None
        self.redis_error = {kind: self.redis_errors.labels(kind) for kind in REDIS_ERROR_KINDS}
        self.plans: frozenset[str] = frozenset()
        for plan in (NO_PLAN, UNKNOWN_PLAN):
            self._bind(plan)
        self.set_plans(plans)

    def set_plans(self, plans: Mapping[str, Plan]) -> None:
        """The plan table's labels and limits (a reload may add, change or remove plans; a
        removed plan's counters stay, as counters do)."""
        for name in self.plans - set(plans):
            for window in ("minute", "day"):
                self.plan_limit.remove(name, window)
        for name, plan in plans.items():
            self._bind(name)
            self.plan_limit.labels(name, "minute").set(plan.rpm)
            self.plan_limit.labels(name, "day").set(plan.rpd)
        self.plans = frozenset(plans)

    def _bind(self, plan: str) -> None:
        if plan in self.ttfb_by_plan:
            return
        for outcome in OUTCOMES:
            self.outcome[(plan, outcome)] = self._tally(self.requests.labels(plan, outcome))
        self.ttfb_by_plan[plan] = Observations(self.ttfb.labels(plan))
        self._batches.append(self.ttfb_by_plan[plan])
        self.fail_open[plan] = self.fail_open_admissions.labels(plan)
        for direction in TOKEN_DIRECTIONS:
            for source in TOKEN_SOURCES:
                child = self.tokens.labels(plan, direction, source)
                self.tokens_by[(plan, direction, source)] = self._tally(child)
        self.credits_by_plan[plan] = self._tally(self.credits_charged.labels(plan))

    def _tally(self, child: Any) -> Tally:
        tally = Tally(child)
        self._batches.append(tally)
        return tally

    def upstream_status(self, plan: str, upstream: str, status: int) -> None:
        cls = STATUS_CLASSES[min(max(status // 100, 1), 5) - 1]
        tally = self.status_by.get((plan, upstream, cls))
        if tally is None:  # bounded: plans x configured upstreams x status classes
            child = self.upstream_responses.labels(plan, upstream, cls)
            tally = self.status_by[(plan, upstream, cls)] = self._tally(child)
        tally.inc()

    def failover(self, source: str, target: str, reason: str) -> None:
        self.upstream_failovers.labels(source, target, reason).inc()

    def available(self, upstream: str, up: bool) -> None:
        self.upstream_available.labels(upstream).set(1 if up else 0)

    def label(self, plan: str) -> str:
        """The plan label for a record's plan name; never an unbounded value."""
        return plan if plan in self.plans else UNKNOWN_PLAN

    def count(self, plan: str, outcome: str) -> None:
        self.outcome[(plan, outcome)].inc()

    def flush(self) -> None:
        """Hand the request path's batched updates to prometheus-client."""
        for batch in self._batches:
            batch.flush()

    def start_flushing(self) -> None:
        """With --workers, flush every FLUSH_EVERY seconds: other workers' scrapes read the
        files this process writes. (A single process flushes when it is scraped.)"""
        if os.environ.get(MULTIPROC_ENV) and self._flusher is None:
            self._flusher = asyncio.get_running_loop().call_later(FLUSH_EVERY, self._tick)

    def _tick(self) -> None:
        self.flush()
        self._flusher = asyncio.get_running_loop().call_later(FLUSH_EVERY, self._tick)

    def stop_flushing(self) -> None:
        """At shutdown: stop the timer, and flush what is left."""
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        self.flush()

    def exposition(self) -> bytes:
        self.flush()
        directory = os.environ.get(MULTIPROC_ENV)
        if not directory:
            return generate_latest(self.registry)
        forget_dead_workers(directory)
        merged = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(merged, path=directory)  # type: ignore[no-untyped-call]
        return generate_latest(merged)


def forget_dead_workers(directory: str) -> None:
    """Drop the live-only gauges of workers that are gone (a crashed worker never says so)."""
    for path in Path(directory).iterdir():
        match = LIVE_GAUGE_FILE.match(path.name)
        if match and not _alive(int(match.group(1))):
            mark_process_dead(int(match.group(1)), directory)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
