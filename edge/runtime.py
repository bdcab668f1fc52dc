"""Everything one running app owns, opened together at start-up and closed in reverse.

Nothing here exists at import time: `open_runtime(settings)` is called by the app's lifespan,
so tests can run many apps, each with its own Redis client, HTTP pool and metrics registry.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from edge.control.specs import NewKey
from edge.control.store import KeyStore
from edge.keys import KeyFormat
from edge.metrics.registry import Metrics
from edge.proxy.access import AccessLog
from edge.proxy.admission import Limiter
from edge.proxy.metering import Pricing
from edge.proxy.settlement import Settler
from edge.redis import clients as connection
from edge.redis.failures import FAILURES
from edge.redis.scripts import Scripts
from edge.redis.types import ScriptClient
from edge.settings import Settings
from edge.transport.upstream.pool import UpstreamPool

log = logging.getLogger("edge")


@dataclass
class Runtime:
    settings: Settings
    redis: Any  # redis-py: key management, listing (a StoreClient)
    hot: ScriptClient  # the request path's client: admission and readiness
    scripts: Scripts
    limiter: Limiter
    metrics: Metrics
    upstream: UpstreamPool
    key_format: KeyFormat
    store: KeyStore
    pricing: Pricing
    settler: Settler
    access: AccessLog | None  # the access log, when `log.access` is on
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

        upstream_base = settings.upstream.url
        if settings.demo_upstream:
            from edge.demo import start_demo_upstream  # aiohttp: loaded only when it runs

            upstream_base = await stack.enter_async_context(start_demo_upstream())
        up = settings.upstream
        upstream = UpstreamPool(
            upstream_base,
            up.max_connections,
            up.connect_timeout,
            up.read_timeout,
            max_head_bytes=up.max_header_bytes,
            max_head_fields=up.max_headers,
        )
        stack.push_async_callback(upstream.close)

        metrics = Metrics(settings.plans)
        metrics.start_flushing()
        stack.callback(metrics.stop_flushing)
        limiter = Limiter(
            hot, scripts, settings.plans, metrics, settings.pricing.request,
            settings.usage.retention_days,
        )  # fmt: skip
        pricing = Pricing(settings.pricing)
        settler = Settler(limiter, pricing, metrics)
        stack.push_async_callback(settler.close)  # before Redis closes: pending settlements
        access = None
        if settings.log.access:
            access = AccessLog(redis)
            access.start()
            stack.push_async_callback(access.close)  # after the last request's line
        yield Runtime(
            settings=settings,
            redis=redis,
            hot=hot,
            scripts=scripts,
            limiter=limiter,
            metrics=metrics,
            upstream=upstream,
            key_format=KeyFormat(settings.keys.prefix),
            store=KeyStore(redis, scripts, settings),
            pricing=pricing,
            settler=settler,
            access=access,
        )


async def create_demo_key(rt: Runtime, asked: bool) -> None:
    """In embedded mode (nothing outside this process can create keys), a demo key for the
    banner to show: always with the demo upstream, with a real one only when `asked`
    (`--demo-key`): a key printed to a console or a log collector would spend the operator's
    provider account."""
    s = rt.settings
    if s.embedded_redis and (s.demo_upstream or asked):
        spec = NewKey(plan=next(iter(s.plans)), name="demo")
        rt.demo_key, _ = await rt.store.create(spec, actor="demo")
