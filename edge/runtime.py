"""Everything one running app owns, opened together at start-up and closed in reverse.

Nothing here exists at import time: `open_runtime(settings)` is called by the app's lifespan,
so tests can run many apps, each with its own Redis client, HTTP pool and metrics registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from edge.control.specs import NewKey
from edge.control.store import KeyStore
from edge.keys import KeyFormat
from edge.metrics.registry import Metrics
from edge.proxy.access import AccessLog
from edge.proxy.admission import Limiter
from edge.proxy.live import Live
from edge.proxy.metering import Pricing
from edge.proxy.policy import provider_headers
from edge.proxy.routing import Breaker, Router, Target
from edge.proxy.settlement import Settler
from edge.proxy.tracing import Tracing
from edge.redis import clients as connection
from edge.redis.failures import FAILURES
from edge.redis.scripts import Scripts
from edge.redis.types import ScriptClient
from edge.settings import Settings
from edge.tls_files import client_context
from edge.transport.upstream.pool import UpstreamPool
from edge.upstream_settings import Upstream
from edge.urls import egress_proxy, redact_url

log = logging.getLogger("edge")


@dataclass
class Runtime:
    settings: Settings
    redis: Any  # redis-py: key management, listing (a StoreClient)
    hot: ScriptClient  # the request path's client: admission and readiness
    scripts: Scripts
    metrics: Metrics
    live: Live  # plans, prices and upstreams: what a reload swaps
    pools: Pools
    key_format: KeyFormat
    store: KeyStore
    settler: Settler
    access: AccessLog | None  # the access log, when `log.access` is on
    tracing: Tracing | None  # OpenTelemetry spans, when `tracing.otlp_endpoint` is set
    demo_key: str | None = None


@contextlib.asynccontextmanager
async def open_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    async with contextlib.AsyncExitStack() as stack:
        redis = connection.connect(settings.redis)
        stack.push_async_callback(redis.aclose)
        hot = connection.hot_path(settings.redis, redis)
        if hot is not redis:
            stack.push_async_callback(hot.aclose)
        scripts = Scripts()
        try:
            await scripts.load(redis)
        except FAILURES as exc:  # Redis may come later; EVAL loads scripts on first use then
            log.warning("could not load Lua scripts into Redis yet (%s); will retry on use", exc)

        demo_url = ""
        if settings.demo_upstream:
            from edge.demo import start_demo_upstream  # aiohttp: loaded only when it runs

            demo_url = await stack.enter_async_context(start_demo_upstream())
        metrics = Metrics(settings.plans)
        metrics.start_flushing()
        stack.callback(metrics.stop_flushing)
        pools = Pools(demo_url)
        stack.push_async_callback(pools.close)
        live = build_live(settings, hot, scripts, metrics, pools, None)
        await pools.warmed(settings.upstream.connect_timeout)
        settler = Settler(live.limiter, metrics)
        stack.push_async_callback(settler.close)  # before Redis closes: pending settlements
        access = None
        if settings.log.access:
            access = AccessLog(redis)
            access.start()
            stack.push_async_callback(access.close)  # after the last request's line
        tracing = None
        if settings.tracing.otlp_endpoint:
            t = settings.tracing
            tracing = Tracing(t.otlp_endpoint, t.service_name, t.sample_ratio)
            stack.push_async_callback(asyncio.to_thread, tracing.shutdown)  # the last spans
        yield Runtime(
            settings=settings,
            redis=redis,
            hot=hot,
            scripts=scripts,
            metrics=metrics,
            live=live,
            pools=pools,
            key_format=KeyFormat(settings.keys.prefix),
            store=KeyStore(redis, scripts, settings),
            settler=settler,
            access=access,
            tracing=tracing,
        )


class Pools:
    """Every upstream pool this app opened, closed at shutdown; `demo_url` stands in for an
    unset `[upstream] url`."""

    def __init__(self, demo_url: str) -> None:
        self.demo_url = demo_url
        self.all: list[UpstreamPool] = []

    def open(self, spec: Upstream) -> UpstreamPool:
        up = spec.settings
        url = up.url or self.demo_url
        https = url.startswith("https://")
        context = client_context(up.ca_file, up.cert_file, up.key_file) if https else None
        proxy = egress_proxy(url, up.proxy, os.environ) if up.url else None  # demo: local
        if proxy:
            log.info("upstream %s is reached through the proxy %s", spec.name, redact_url(proxy))
        pool = UpstreamPool(
            url,
            up.max_connections,
            up.connect_timeout,
            up.read_timeout,
            ssl_context=context,
            max_head_bytes=up.max_header_bytes,
            max_head_fields=up.max_headers,
            proxy=proxy,
            min_connections=up.min_connections,
        )
        self.all.append(pool)
        pool.warm()  # in the background; open_runtime waits a while for the first ones
        return pool

    async def warmed(self, within: float) -> None:
        """Wait up to `within` seconds for the pools' warm-ups (`upstream.min_connections`)
        to finish, so a new instance has its connections before it serves; what is not open
        by then opens in the background."""
        running = [task for pool in self.all if (task := pool.warm()) is not None]
        if not running:
            return
        _, late = await asyncio.wait(running, timeout=within)
        for pool in self.all:
            if pool.min_connections:
                log.info(
                    "upstream %s: %d of %d connections open ahead of demand%s",
                    pool.origin.host, pool.open_count, pool.min_connections,
                    " (the rest open in the background)" if late else "",
                )  # fmt: skip

    async def close(self) -> None:
        for pool in self.all:
            await pool.close()


def build_live(
    settings: Settings,
    hot: ScriptClient,
    scripts: Scripts,
    metrics: Metrics,
    pools: Pools,
    old: Live | None,
) -> Live:
    """The reloadable configuration as requests use it. An upstream whose settings did not
    change keeps its pool (its warm connections) and its breaker from `old`."""
    kept = {t.name: t for t in old.router.targets} if old is not None else {}
    routing = settings.routing
    targets = []
    for spec in settings.upstream_list:
        before = kept.get(spec.name)
        if before is not None and before.spec.settings == spec.settings:
            pool, breaker = before.pool, before.breaker
            breaker.failures, breaker.window = routing.cooldown_failures, routing.cooldown_window
            breaker.cooldown = routing.cooldown_seconds
        else:
            pool = pools.open(spec)
            breaker = Breaker(
                routing.cooldown_failures, routing.cooldown_window, routing.cooldown_seconds
            )
        targets.append(Target(spec, pool, provider_headers(spec.settings), breaker))
        metrics.available(spec.name, True)
    limiter = Limiter(
        hot, scripts, settings.plans, metrics, settings.pricing.request,
        settings.usage.retention_days,
    )  # fmt: skip
    return Live(settings, limiter, Pricing(settings.pricing), Router(targets, routing))


def retire_replaced(old: Live, new: Live) -> None:
    """Close what `new` no longer uses, once its requests are done with it (a retired pool
    stays in `Pools.all`, closed at shutdown if a request still holds a connection then)."""
    using = {id(t.pool) for t in new.router.targets}
    for target in old.router.targets:
        if id(target.pool) not in using:
            target.pool.retire()


async def create_demo_key(rt: Runtime, asked: bool) -> None:
    """In embedded mode (nothing outside this process can create keys), a demo key for the
    banner to show: always with the demo upstream, with a real one only when `asked`
    (`--demo-key`): a key printed to a console or a log collector would spend the operator's
    provider account."""
    s = rt.settings
    if s.embedded_redis and (s.demo_upstream or asked):
        spec = NewKey(plan=next(iter(s.plans)), name="demo")
        rt.demo_key, _ = await rt.store.create(spec, actor="demo")
