"""Settling metered requests after their answers: one settle.lua call each, in the background,
never delaying an answer.

A settlement carries a random id that settle.lua remembers for an hour, so sending it again is
harmless: a call that timed out may have run, and is retried. What is retried: a settlement
whose call failed because Redis was unavailable, up to RETRY_DELAYS times over about four
seconds. What is lost: a settlement still failing after that, or pending when the process is
killed (a SIGTERM drain waits for pending ones, up to DRAIN_SECONDS); each loss is counted
(`edge_settlement_failures_total`) and logged. A lost settlement charges nothing: the key got
those tokens free.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import secrets
from typing import Any, NamedTuple

from edge.errors import RedisUnavailable
from edge.metrics.registry import Metrics
from edge.proxy.admission import Decision, Limiter
from edge.proxy.metering import Pricing
from edge.proxy.usage import Usage

log = logging.getLogger("edge.settlement")
RETRY_DELAYS = (0.05, 0.25, 1.0, 2.5)
DRAIN_SECONDS = 5.0


_IDS = itertools.count()
_PREFIX = secrets.token_hex(6)  # this process's; with a counter, ids unique without a syscall


def settlement_id() -> str:
    return f"{_PREFIX}{next(_IDS):x}"


class Job(NamedTuple):
    kid: str
    plan: str  # the metrics label
    settlement: str  # the id that makes it count once
    tokens_in: int
    tokens_out: int
    cost: int  # micro-credits
    tpm: int
    tpd: int


class Settler:
    """Settles in the background. The usual way costs no coroutine and no task: the settle.lua
    call goes out at once on the request path's own Redis connection and a callback reads its
    reply. A call that cannot go out that way, or fails, is retried by a task (`_retry`)."""

    def __init__(self, limiter: Limiter, metrics: Metrics) -> None:
        self.limiter = limiter  # settle.lua's caller (retention days cannot change live)
        self.metrics = metrics
        self._pending: set[asyncio.Future[Any]] = set()

    def submit(
        self, kid: str, plan: str, decision: Decision, model: str | None, usage: Usage,
        pricing: Pricing,
    ) -> None:  # fmt: skip
        """Settle `usage` for `kid` (`plan`: its metrics label) in the background, at the
        prices the request started with."""
        cost = 0
        if decision.has_balance:  # an unlimited key spends no credits
            cost = pricing.cost_micros(pricing.price(model), usage)
        source = "reported" if usage.reported else "estimated"
        self.metrics.tokens_by[(plan, "input", source)].inc(usage.input)
        self.metrics.tokens_by[(plan, "output", source)].inc(usage.output)
        if usage.input + usage.output == 0 and cost == 0:
            return  # nothing to charge
        job = Job(
            kid, plan, settlement_id(), usage.input, usage.output, cost,
            decision.tpm, decision.tpd,
        )  # fmt: skip
        sent = self.limiter.settle_now(
            kid, job.settlement, job.tokens_in, job.tokens_out, cost, job.tpm, job.tpd
        )
        if sent is None:
            self._retry(job)
            return
        self._pending.add(sent)
        sent.add_done_callback(functools.partial(self._answered, job))

    def _answered(self, job: Job, reply: asyncio.Future[Any]) -> None:
        self._pending.discard(reply)
        if reply.cancelled() or reply.exception() is not None:
            self._retry(job)  # NOSCRIPT, a timeout, a lost connection: the careful way
            return
        self._charged(job, reply.result())

    def _charged(self, job: Job, reply: Any) -> None:
        charged = int(reply[1]) if len(reply) > 1 else 0
        if charged:
            self.metrics.credits_by_plan[job.plan].inc(charged)

    def _retry(self, job: Job) -> None:
        task = asyncio.get_running_loop().create_task(self._settle(job))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _settle(self, job: Job) -> None:
        """Through the awaitable path (NOSCRIPT reloaded, errors translated), with retries;
        the settlement id makes a call that did run before count once."""
        for delay in (*RETRY_DELAYS, None):
            try:
                done = await self.limiter.settle(
                    job.kid, job.settlement, job.tokens_in, job.tokens_out, job.cost, job.tpm,
                    job.tpd,
                )  # fmt: skip
            except RedisUnavailable as exc:
                if delay is None:
                    self.metrics.settlement_failures.inc()
                    log.warning(
                        "could not settle %d tokens for key %s: %s (%s); they may not have "
                        "been charged",
                        job.tokens_in + job.tokens_out, job.kid, exc.kind, exc.detail,
                    )  # fmt: skip
                    return
                await asyncio.sleep(delay)
                continue
            if done.charged:
                self.metrics.credits_by_plan[job.plan].inc(done.charged)
            return

    async def close(self) -> None:
        """At shutdown: let pending settlements finish (bounded), count the rest as lost."""
        if not self._pending:
            return
        _, late = await asyncio.wait(set(self._pending), timeout=DRAIN_SECONDS)
        for pending in late:
            pending.cancel()
            self.metrics.settlement_failures.inc()
        if late:
            log.warning("%d settlements still pending at shutdown were not written", len(late))
