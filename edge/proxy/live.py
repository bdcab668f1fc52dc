"""The part of the configuration a reload swaps: plans (in the limiter), prices, metering and
the upstreams. A request takes the `Live` current when it starts and keeps it to the end, so a
reload never changes a request half-way (docs/upstreams.md, "Reloading")."""

from __future__ import annotations

from edge.proxy.admission import HAS_BALANCE, Limiter
from edge.proxy.metering import Pricing
from edge.proxy.routing import Router
from edge.settings import Settings


class Live:
    __slots__ = ("inject", "limiter", "priced_flag", "pricing", "router", "settings")

    def __init__(
        self, settings: Settings, limiter: Limiter, pricing: Pricing, router: Router
    ) -> None:
        self.settings = settings
        self.limiter = limiter
        self.pricing = pricing
        self.router = router
        # keys with a balance are metered when tokens have prices
        self.priced_flag = HAS_BALANCE if pricing.token_priced else 0
        self.inject = settings.metering.stream_usage == "inject"
