"""Which upstream a request goes to: by route rule, then by model glob, in weighted random
order among the healthy ones; and each upstream's circuit breaker.

With one upstream (today's `[upstream]`) the router is `single` and the data plane asks it
nothing: no body is read to route a request.
"""

from __future__ import annotations

import random
import re
from collections import deque
from collections.abc import Callable, Sequence
from time import monotonic

from edge import errors
from edge.proxy.metering import glob_regex
from edge.proxy.policy import BodyModel, RawHeaders
from edge.transport.upstream.pool import UpstreamPool
from edge.upstream_settings import RoutingSettings, Upstream


class Breaker:
    """One upstream's circuit breaker in this process: `failures` failures within `window`
    seconds take it out for `cooldown` seconds; then live traffic probes it, and the first
    failure of a probe takes it out again at once."""

    def __init__(
        self, failures: int, window: float, cooldown: float, clock: Callable[[], float] = monotonic
    ) -> None:
        self.failures = failures
        self.window = window
        self.cooldown = cooldown
        self.clock = clock
        self.recent: deque[float] = deque()
        self.out_until = 0.0
        self.last_failure = 0.0
        self.probing = False

    def available(self) -> bool:
        if self.out_until and self.clock() >= self.out_until:
            self.out_until = 0.0
            self.probing = True  # back in: the next answer decides
        return not self.out_until

    def failed(self) -> None:
        now = self.last_failure = self.clock()
        recent = self.recent
        recent.append(now)
        while recent and recent[0] <= now - self.window:
            recent.popleft()
        if len(recent) >= self.failures or self.probing:
            self.out_until = now + self.cooldown
            self.probing = False
            recent.clear()

    def succeeded(self) -> None:
        self.probing = False


class Target:
    """One upstream as requests use it: its pool, the headers edge adds, where its API lives,
    the models and routes it serves, and its breaker."""

    def __init__(
        self, spec: Upstream, pool: UpstreamPool, provider: RawHeaders, breaker: Breaker
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.pool = pool
        self.provider = provider
        self.base_path = pool.origin.base_path
        self.weight = spec.weight
        self.breaker = breaker
        self._models = [glob_regex(glob) for glob in spec.models]
        self.serves_all = "*" in spec.models

    def serves(self, model: str) -> bool:
        return any(pattern.fullmatch(model) for pattern in self._models)

    def claims(self, route: str) -> bool:
        """Whether a `routes` rule sends `route` (the path after /v1/) here."""
        return any(route == rule or route.startswith(rule + "/") for rule in self.spec.routes)


MODEL_ROUTE = re.compile(r"models/(.+)")


class Router:
    """The upstreams, in the configured order (the first takes what names no model)."""

    def __init__(self, targets: Sequence[Target], routing: RoutingSettings) -> None:
        self.targets = list(targets)
        self.first = self.targets[0]
        self.single = len(self.targets) == 1
        self.max_attempts = routing.max_attempts
        self.failover_statuses = frozenset(routing.failover_statuses)
        self.has_rules = any(t.spec.routes for t in self.targets)

    def claimed(self, route: str) -> list[Target]:
        """The upstreams a `routes` rule gives `route` to (none: route it by its model)."""
        return [t for t in self.targets if t.claims(route)] if self.has_rules else []

    def serving(self, model: str | None) -> list[Target]:
        """The upstreams that serve `model`; no model: the first upstream."""
        if model is None:
            return [self.first]
        return [t for t in self.targets if t.serves(model)]

    def order(self, targets: list[Target]) -> list[Target]:
        """The order to try `targets` in, at most `max_attempts` of them: the available ones
        in weighted random order; when none is, the least recently failed first."""
        healthy = [t for t in targets if t.breaker.available()]
        if not healthy:
            return sorted(targets, key=lambda t: t.breaker.last_failure)[: self.max_attempts]
        if len(healthy) == 1:
            return healthy
        ordered: list[Target] = []
        weights = [t.weight for t in healthy]
        while healthy and len(ordered) < self.max_attempts:
            i = random.choices(range(len(healthy)), weights)[0]
            ordered.append(healthy.pop(i))
            weights.pop(i)
        return ordered

    def choose(
        self, route: str, claimed: list[Target], read: BodyModel | None
    ) -> tuple[list[Target] | errors.EdgeError, str | None]:
        """The upstreams to try in turn for a request (an error when none can take it), and
        the model it was routed by: `claimed` (its route's `routes` rule upstreams), else those
        serving its model (`read`: the body's, None when no body was read: then the path's
        for `models/<id>`); no model: the first one."""
        if claimed:
            return self.order(claimed), None
        if read is not None:
            if read.problem is not None:  # two `model` fields: which would the upstream read?
                return errors.BadRequest(read.problem, code=read.code, param="model"), None
            model = read.model
        else:
            model = self.model_of_route(route)
        serving = self.serving(model)
        if not serving:
            return errors.ModelNotFound(model or ""), model
        return self.order(serving), model

    def model_of_route(self, route: str) -> str | None:
        """`models/<id>` names its model in the path."""
        match = MODEL_ROUTE.fullmatch(route)
        return match.group(1) if match else None
