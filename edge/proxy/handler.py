"""The /v1 data plane: a raw ASGI handler that authenticates, admits and relays.

Per request: check the target and headers (`policy.py`, no I/O) → parse the key (no I/O) → one
`admit.lua` call → the upstream request through the keep-alive pool of its upstream (with
several, `routing.py` picks by the body's model and fails over), with the client's key swapped
for the provider's and hop-by-hop headers dropped → the upstream's status, headers and bytes
relayed piece by piece as they arrive (`relay.py`), never decoded or buffered whole.

The upstream client's errors are translated here and nowhere else; anything else that escapes
is an edge bug, logged with its traceback and answered 500.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from time import perf_counter
from typing import Any, Protocol

from edge import errors
from edge.errors import RedisUnavailable
from edge.keys import KeyFormat, ParsedKey
from edge.logs import Throttle
from edge.metrics.registry import MULTIPROC_ENV, NO_PLAN, Metrics
from edge.proxy.access import AccessLog, upstream_request_id
from edge.proxy.access import entry as access_entry
from edge.proxy.admission import (
    ADMITTED,
    MODEL_NOT_READ,
    NO_BODY,
    NO_LIMIT,
    SHADOW_OUTCOMES,
    Code,
    Decision,
    model_state,
    rejection,
)
from edge.proxy.credentials import Found, KeyHeaders
from edge.proxy.exchange import (
    BODYLESS,
    AccessNote,
    BodyTooLarge,
    ClientGone,
    Exchange,
    Receive,
    Scope,
    Send,
)
from edge.proxy.fail_open import FailOpen
from edge.proxy.hints import KidHints
from edge.proxy.live import Live
from edge.proxy.metering import METERED_ROUTES, Meter, UnusableBody, prepare
from edge.proxy.models_list import answer_models
from edge.proxy.policy import (
    ALLOW,
    API_PREFIX,
    FORWARDED_METHODS,
    BodyModel,
    Inbound,
    TargetPolicy,
    TrustedProxies,
    forwarded_headers,
    inbound_headers,
    upstream_target,
)
from edge.proxy.relay import Relay
from edge.proxy.routing import Target
from edge.proxy.settlement import Settler
from edge.proxy.tracing import TRACE_HEADERS, Tracing
from edge.settings import Settings
from edge.transport.upstream.errors import PoolFull, UpstreamError


class Resources(Protocol):
    """What the data plane takes from the running app at start-up (the composition root's
    `Runtime` has these; the data plane knows nothing else of it)."""

    settings: Settings
    redis: Any  # a StoreClient: a scoped key's model list reads its scopes
    live: Live  # the reloadable part, as it was at start-up
    metrics: Metrics
    key_format: KeyFormat
    settler: Settler
    access: AccessLog | None
    tracing: Tracing | None


log = logging.getLogger("edge.proxy.handler")

NO_KEY = (
    "Incorrect API key provided: you didn't provide an API key. Send it in the header "
    "'Authorization: Bearer <key>'."
)
CONFLICTING_KEYS = (
    "Two different API keys were sent (in the Authorization, api-key or x-api-key headers); "
    "send one."
)
STARTING = errors.ServiceUnavailable("The server is not ready yet: edge is starting up.")
METHOD_REFUSED = errors.MethodNotAllowed(
    "This method is not forwarded. edge forwards GET, HEAD, POST, PUT, PATCH, DELETE and OPTIONS."
)
SHORT_REPLIES = (Code.UNKNOWN, Code.REVOKED, Code.EXPIRED, Code.PAUSED, Code.PLAN_MISSING)
NO_LENGTH = frozenset({"GET", "HEAD", "OPTIONS"})  # bodyless: no Content-Length: 0
NO_TARGETS: list[Target] = []  # one upstream: no `routes` rule claims a request (never changed)


class Proxy:
    """The raw ASGI callable for /v1/*. Resources arrive via `bind()` at start-up."""

    def __init__(self) -> None:
        self.rt: Resources | None = None
        self._throttle = Throttle()
        self._model_scoped = KidHints()

    def bind(self, rt: Resources) -> None:
        self.rt = rt
        self._loop = asyncio.get_running_loop()
        self.policy = TargetPolicy(rt.settings.keys.prefix, rt.settings.server.max_body_bytes)
        redis = rt.settings.redis
        self._fail_open = (
            FailOpen(redis.fail_open_auth_ttl, shared_dir=os.environ.get(MULTIPROC_ENV))
            if redis.fail_open
            else None
        )
        self._trusted = TrustedProxies(rt.settings.server.trusted_proxies)
        self._keys = KeyHeaders(rt.settings.keys.headers, rt.settings.keys.prefix)
        self._access = rt.access
        self._tracing = rt.tracing
        self._relay = Relay(self._log_throttled, rt.settings.server.sse_keepalive)
        self._answer = self._relay.answer
        self.live = rt.live

    def swap(self, live: Live) -> None:
        """A reload: requests from now on use `live`; those under way keep theirs."""
        self.live = live

    def refresh_available(self) -> None:
        """`edge_upstream_available` as of now (a breaker's cooldown ends without traffic)."""
        if self.rt is not None:
            for target in self.live.router.targets:
                self.rt.metrics.available(target.name, target.breaker.available())

    def key_changed(self, kid: str) -> None:
        """A key was changed through this instance's admin API (`KeyStore.on_change`)."""
        if self._fail_open is not None:
            self._fail_open.forget(kid)
        if self._access is not None:
            self._access.forget(kid)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rt = self.rt
        if rt is None:
            await errors.send_error(send, STARTING)
            return
        ex = Exchange(scope, receive, send, self._loop)
        if self._access is not None:
            ex.note = AccessNote()
        if self._tracing is not None:
            ex.trace = self._tracing.start(scope["headers"], ex.method, scope["path"])
        rt.metrics.active.inc()
        try:
            await self._handle(rt, self.live, ex)
        except asyncio.CancelledError:
            if not ex.client_gone:
                raise
            if ex.task is not None:
                ex.task.uncancel()
        except Exception:
            log.exception("unexpected error handling a /v1 %s request", ex.method)
            if not ex.started:
                ex.status = 500
                request_id = [(b"x-request-id", ex.the_request_id())]
                await errors.send_error(send, errors.EdgeError(), request_id)
        finally:
            ex.stop()
            if ex.outcome is not None:
                rt.metrics.count(ex.plan, ex.outcome)
            if ex.trace is not None:
                ex.trace.finish(ex.kid, ex.plan, ex.outcome, ex.status)
            rt.metrics.active.dec()
            if ex.note is not None and self._access is not None:
                # only a key that proved itself has its owner looked up: a stranger's made-up
                # key ids cost no Redis call
                known = ex.kid if ex.note.plan is not None else None
                self._access.add(access_entry(ex, ex.note, self._trusted), known)

    async def _handle(self, rt: Resources, live: Live, ex: Exchange) -> None:
        scope = ex.scope
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope["query_string"]
        if ex.method not in FORWARDED_METHODS:
            await ex.fail(METHOD_REFUSED, "bad_request", ALLOW)
            return
        inbound = inbound_headers(scope["headers"])
        bad = self.policy.check(raw_path, query, inbound.length)
        if bad is not None:
            await ex.fail(bad, "bad_request")
            return
        found, token = self._keys.find(inbound.credentials)
        key = rt.key_format.parse(token) if token is not None else None
        if key is None:
            message = NO_KEY if found is Found.MISSING else None
            if found is Found.CONFLICT:
                message = CONFLICTING_KEYS
            await ex.fail(errors.InvalidApiKey(message), "unauthorized")
            return
        ex.kid = key.kid
        route = raw_path[len(API_PREFIX) :].decode("ascii")  # ASCII: checked by the policy
        try:
            decision = await self._admit(live, ex, key, route)
        except RedisUnavailable as exc:
            self._log_throttled("redis", "Redis unavailable (%s): %s", exc.kind, exc.detail)
            fallback = self._fail_open.admit(key) if self._fail_open else None
            if fallback is None:
                await ex.fail(exc, "unavailable")
                return
            decision = fallback
            plan = rt.metrics.label(decision.plan)
            rt.metrics.fail_open[plan].inc()
            self._log_throttled(
                "fail-open", "fail-open: admitted key %s (plan %s) without Redis", key.kid, plan
            )
        except ClientGone:
            return  # left before admission: nothing charged, nothing to answer
        except BodyTooLarge:
            await ex.fail(self.policy.too_large(), "bad_request")
            return
        if decision.code not in ADMITTED:
            await self._reject(rt, ex, decision, key.kid, route)
            return
        ex.admitted(decision, rt.metrics.label(decision.plan))
        if decision.code != Code.ADMITTED:  # a shadowed key its limits would have refused
            ex.outcome = SHADOW_OUTCOMES[decision.code]
            self._log_throttled(
                f"shadow-{decision.code}", "shadow limit: key %s (plan %s) would have been "
                "refused (%s)", key.kid, decision.plan, ex.outcome,
            )  # fmt: skip
        if ex.note is not None:
            ex.note.plan = decision.plan
        if route == "models" and ex.method == "GET" and not live.router.single:
            await answer_models(ex, rt.redis, live.router.targets, inbound.headers)
            return
        await self._forward(rt, live, ex, raw_path, query, inbound, key.kid, route)

    async def _admit(self, live: Live, ex: Exchange, key: ParsedKey, route: str) -> Decision:
        """One admit.lua call; two only the first time a key with model scopes is seen.

        Only keys with model scopes have their body read before admission (to give the script
        the `model`). Which keys those are, this instance learns from the script's replies and
        remembers as a hint: a wrong hint costs a body parse or a second call, never a wrong
        decision, since the scopes themselves are checked in Redis on every request.

        The hint is kept by the key's hash, so only a key that proved itself (Redis matched
        its hash) has its body read before it is authenticated. A stranger, even one who
        forged a well-formed key for a known key id, is refused before edge reads a byte of
        its body.
        """
        hinted = key.hash in self._model_scoped
        model = await self._model(ex) if hinted else MODEL_NOT_READ
        span = ex.trace.admission() if ex.trace is not None else None
        try:
            decision = await live.limiter.admit(key, route, model)
            if decision.code == Code.NEED_MODEL:
                decision = await live.limiter.admit(key, route, await self._model(ex))
        finally:
            if span is not None:
                span.end()
        if decision.model_scoped != hinted and decision.code not in SHORT_REPLIES:
            self._model_scoped.note(key.hash, decision.model_scoped)
        if self._fail_open:
            self._fail_open.note(key, decision)
        return decision

    async def _model(self, ex: Exchange) -> str:
        """admit.lua's model argument from the whole body, read now and kept for the upstream."""
        framed = any(name == b"content-length" for name, _ in ex.scope["headers"])
        body = await ex.read_body(self.policy.max_body, framed)
        if not body and ex.method in BODYLESS:
            return NO_BODY
        return model_state(ex.model(body).model)

    async def _reject(self, rt: Resources, ex: Exchange, d: Decision, kid: str, route: str) -> None:
        read = ex.model_read
        answer = rejection(d, route, read.model if read is not None else None)
        ex.plan = rt.metrics.label(d.plan) if answer.known else NO_PLAN
        if ex.note is not None and answer.known:
            ex.note.plan = d.plan
        if d.code == Code.PLAN_MISSING:
            self._log_throttled(
                "plan-missing", "key %s has plan %r, which is not configured", kid, d.plan
            )
        error = answer.error
        if d.code == Code.MODEL_UNREADABLE and read is not None and read.problem is not None:
            # what exactly is wrong with the body's model
            error = errors.BadRequest(read.problem, code=read.code, param="model")
        await ex.fail(error, answer.outcome, answer.headers)

    async def _forward(
        self, rt: Resources, live: Live, ex: Exchange, raw_path: bytes, query: bytes,
        inbound: Inbound, kid: str, route: str,
    ) -> None:  # fmt: skip
        d = ex.decision
        router = live.router
        claimed = router.claimed(route) if not router.single else NO_TARGETS  # `routes` rules
        meter = None
        headers = inbound.headers
        data: bytes | AsyncIterator[bytes] | None
        try:
            if (
                d is not None
                and (d.tpm != NO_LIMIT or d.tpd != NO_LIMIT or d.flags & live.priced_flag)
                and route in METERED_ROUTES
            ):  # a metered key (a token limit, or a balance while tokens have prices) on a
                # route whose answers use tokens: see metering.py; every other key skips it all
                data, meter = await self._meter(ex, route, live.inject)
                headers = [(n, v) for n, v in headers if n != b"accept-encoding"]
            else:
                if not router.single and ex.method not in BODYLESS and not claimed:
                    # several upstreams: the body's model says which (read whole, kept)
                    await ex.read_body(self.policy.max_body, inbound.length is not None)
                data = await ex.request_body(self.policy.max_body, inbound.length is not None)
        except ClientGone:
            return  # admitted and charged: counted as allowed, nothing left to answer
        except BodyTooLarge:
            await ex.fail(self.policy.too_large(), "bad_request")
            return
        except UnusableBody as exc:  # nothing was sent: the request price goes back
            if d is not None and d.has_balance:
                await self._refund(live, kid)
            unusable = errors.BadRequest(exc.problem, code="invalid_body", param="model")
            await ex.fail(unusable, "bad_request")
            return
        if router.single:
            targets = router.targets
        else:
            read = None  # the model to route by: as metering read it, or the body's
            if meter is not None:
                read = BodyModel(meter.model)
            elif isinstance(data, bytes):
                read = ex.model(data)
            chosen, model = router.choose(route, claimed, read)
            if ex.note is not None and model is not None:
                ex.note.model = model
            if isinstance(chosen, errors.EdgeError):  # nothing was sent: nothing is charged
                if d is not None and d.has_balance:
                    await self._refund(live, kid)
                await ex.fail(chosen, "bad_request")
                return
            targets = chosen if data is None or isinstance(data, bytes) else chosen[:1]
        client = ex.scope.get("client")
        peer = client[0] if client else None
        trusted = self._trusted.trusts(peer)
        scheme = ex.scope.get("scheme", "http")
        headers = headers + forwarded_headers(inbound.forwarding, peer, scheme, trusted)
        method = ex.method
        length: int | None
        if isinstance(data, bytes):
            length = len(data)
        elif data is None:
            length = None if method in NO_LENGTH else 0
        else:
            length = int(inbound.length) if inbound.length else ex.spooled_length

        note = ex.note
        if note is not None:
            note.request_bytes = length or 0
            note.model = meter.model if meter is not None else note.model
        sent = perf_counter()
        rt.metrics.admitted.observe(sent - ex.start)
        last = len(targets) - 1
        trace = ex.trace
        if trace is not None:  # the upstream gets edge's traceparent, not the client's
            headers = [(n, v) for n, v in headers if n not in TRACE_HEADERS]
        for attempt, target in enumerate(targets):
            upstream_path = upstream_target(target.base_path, raw_path, query)
            sending = headers + target.provider
            span = None
            if trace is not None:
                span, traced = trace.upstream(target.name)
                sending += traced
            try:
                resp = await target.pool.request(method, upstream_path, sending, data, length)
            except (UpstreamError, ClientGone, BodyTooLarge) as exc:
                if trace is not None and span is not None:
                    trace.failed(span, type(exc).__name__)
                    span.end()
                failed = isinstance(exc, UpstreamError)
                if failed and not isinstance(exc, PoolFull):  # PoolFull: edge's own limit
                    self._failed(rt, target)
                never_sent = failed and exc.never_sent  # type: ignore[union-attr]
                if never_sent and attempt < last and not ex.client_gone:
                    rt.metrics.failover(target.name, targets[attempt + 1].name, "unreachable")
                    continue
                if never_sent and d is not None and d.has_balance:
                    await self._refund(live, kid)
                if ex.client_gone:
                    return
                if ex.too_large:
                    await ex.fail(self.policy.too_large(), "bad_request")
                    return
                assert isinstance(exc, UpstreamError)
                await ex.fail(self._relay.error(exc, target.name), "upstream_error")
                return
            except asyncio.CancelledError:
                if span is not None:
                    span.end()
                if meter is not None and d is not None and ex.client_gone:
                    # left while the upstream was at work on it: its request is charged
                    self._settle(rt, live, ex, kid, d, meter)
                raise
            if span is not None:
                span.set_attribute("http.response.status_code", resp.status)
                span.end()
            rt.metrics.upstream_status(ex.plan, target.name, resp.status)
            if resp.status in router.failover_statuses:
                self._failed(rt, target)
                if attempt < last:  # nothing has reached the client: the next one may serve
                    rt.metrics.failover(target.name, targets[attempt + 1].name, str(resp.status))
                    resp.close()
                    continue
            else:
                target.breaker.succeeded()
            break
        streamed = not (data is None or isinstance(data, bytes))
        if streamed and ex.link is not None and ex.link.cycle.more_body:
            ex.link.end_after_answer()  # answered before the upload ended: read no more of it
        try:
            ttfb = perf_counter() - sent
            rt.metrics.ttfb_by_plan[ex.plan].observe(ttfb)
            if note is not None:
                note.ttfb, note.upstream_id = ttfb, upstream_request_id(resp.headers)
            await self._answer(resp, ex, meter)
        finally:
            resp.close()
            if meter is not None and d is not None:  # after the last byte, even a cut one
                self._settle(rt, live, ex, kid, d, meter)

    def _failed(self, rt: Resources, target: Target) -> None:
        target.breaker.failed()
        if not target.breaker.available():
            rt.metrics.available(target.name, False)
            self._log_throttled(
                f"cooldown-{target.name}", "upstream %s held out for %g s after failures",
                target.name, target.breaker.cooldown,
            )  # fmt: skip

    @staticmethod
    def _settle(
        rt: Resources, live: Live, ex: Exchange, kid: str, d: Decision, meter: Meter
    ) -> None:
        usage = meter.usage()
        rt.settler.submit(kid, ex.plan, d, meter.model, usage, live.pricing)
        if ex.note is not None:
            ex.note.tokens = (usage.input, usage.output)

    async def _meter(self, ex: Exchange, route: str, inject: bool) -> tuple[bytes | None, Meter]:
        """A metered request's whole body as it goes upstream (see metering.prepare), and the
        Meter of its answer. Raises UnusableBody, ClientGone or BodyTooLarge."""
        framed = any(name == b"content-length" for name, _ in ex.scope["headers"])
        body = await ex.read_body(self.policy.max_body, framed)
        if not body and ex.method in BODYLESS:
            return None, Meter(None, 0, False)
        prepared = prepare(body, route, inject)
        if prepared.problem is not None:
            raise UnusableBody(prepared.problem)
        return prepared.body, Meter(prepared.model, len(body), prepared.strip)

    async def _refund(self, live: Live, kid: str) -> None:
        """The upstream never got the request: give its credit back (docs/guarantees.md)."""
        try:
            await live.limiter.refund(kid)
        except RedisUnavailable as exc:
            self._log_throttled("refund", "could not refund a credit to key %s: %s", kid, exc.kind)

    def _log_throttled(self, key: str, msg: str, *args: object) -> None:
        ok, suppressed = self._throttle.allow(key)
        if ok:
            suffix = f" ({suppressed} more since the last line)" if suppressed else ""
            log.warning(msg + suffix, *args)
