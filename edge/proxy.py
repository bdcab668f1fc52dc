"""The /v1 data plane: a raw ASGI handler that authenticates, admits and relays.

Per request: inspect the headers once (no I/O) → parse the key (no I/O) → one `admit.lua`
call → the upstream request through the one pooled aiohttp session, with the client's key
swapped for the provider's and hop-by-hop headers dropped → the upstream's status, headers and
bytes relayed chunk by chunk as they arrive, never decoded or buffered whole.

A client that goes away, before or after the first upstream byte, cancels the upstream request
at once (a watcher task waits for `http.disconnect`), so the pool slot is freed and the provider
stops generating. aiohttp exceptions are translated here and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from time import perf_counter
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import unquote_to_bytes

import aiohttp
from yarl import URL

from edge import errors
from edge.keys import bearer_token
from edge.limiter import (
    ADMITTED,
    DAY_EMPTY,
    EXPIRED,
    MINUTE_EMPTY,
    PAUSED,
    PLAN_MISSING,
    REVOKED,
    Decision,
    Headers,
    rate_limit_headers,
    rejection_headers,
)
from edge.logs import Throttle
from edge.metrics import NO_PLAN
from edge.scripts import RedisUnavailable

if TYPE_CHECKING:
    from edge.runtime import Runtime

log = logging.getLogger("edge.proxy")

Scope = dict[str, Any]
Receive = Any
Send = Any

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
# Besides hop-by-hop: the client's credentials (in any header a client might put them), and
# framing aiohttp sets itself for the upstream connection.
REQUEST_DROP = HOP_BY_HOP | {
    b"host",
    b"authorization",
    b"content-length",
    b"expect",
    b"api-key",
    b"x-api-key",
}
# Besides hop-by-hop: uvicorn writes its own Date; edge's rate-limit headers replace the
# provider's (which describe the operator's account, not the client's key), and the provider's
# organisation and project ids are the operator's business.
RESPONSE_DROP = HOP_BY_HOP | {
    b"date",
    b"ratelimit",
    b"ratelimit-policy",
    b"openai-organization",
    b"openai-project",
}
BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})
WATCH_AFTER = 0.05  # seconds before a request starts watching for its client to leave


class Inbound(NamedTuple):
    """What the upstream request needs from the client's headers."""

    headers: list[tuple[str, str]]  # to forward: no hop-by-hop, no client credentials
    auth: bytes | None  # the one Authorization value; None when absent or repeated
    length: bytes | None  # Content-Length as sent


def inbound_headers(raw: list[tuple[bytes, bytes]]) -> Inbound:
    """One pass over the client's headers (names already lower-cased by the server)."""
    headers: list[tuple[str, str]] = []
    auth: list[bytes] = []
    length: bytes | None = None
    listed: bytes | None = None
    for name, value in raw:
        if name in REQUEST_DROP:
            if name == b"authorization":
                auth.append(value)
            elif name == b"content-length":
                length = value
            elif name == b"connection":
                listed = value if listed is None else listed + b"," + value
            continue
        headers.append((name.decode("latin-1"), value.decode("latin-1")))
    if listed is not None:
        drop = {t.strip().lower().decode("latin-1") for t in listed.split(b",")}
        headers = [(n, v) for n, v in headers if n not in drop]
    return Inbound(headers, auth[0] if len(auth) == 1 else None, length)


class _Exchange:
    """The state of one /v1 request that the watcher and the body stream share."""

    __slots__ = (
        "client_gone",
        "finished",
        "receive",
        "started",
        "task",
        "timer",
        "too_large",
        "watcher",
    )

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.task: asyncio.Task[Any] | None = asyncio.current_task()
        self.watcher: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.started = False
        self.finished = False
        self.client_gone = False
        self.too_large = False

    def watch(self) -> None:
        """Start waiting for the client to go away; called once the body is fully read.

        A request that is over within `WATCH_AFTER` seconds never pays for the watcher task;
        a client that leaves sooner is noticed when the timer fires.
        """
        self.timer = asyncio.get_running_loop().call_later(WATCH_AFTER, self._start_watch)

    def _start_watch(self) -> None:
        self.timer = None
        if not self.finished:
            self.watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        if not self.finished and self.task is not None:
            self.client_gone = True
            self.task.cancel()

    def stop(self) -> None:
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
        if self.watcher is not None:
            self.watcher.cancel()


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


async def send_error(send: Send, err: errors.EdgeError, extra: Headers | None = None) -> None:
    body = err.body()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if extra:
        headers += extra
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def unsafe_path(raw: bytes) -> bool:
    """True for a path the upstream could resolve outside the API base: dot-segments, encoded
    slashes or backslashes, control characters or non-ASCII bytes."""
    if not raw.isascii():
        return True
    if b"." not in raw and b"%" not in raw and b"\\" not in raw:
        return False
    for segment in raw.split(b"/"):
        decoded = unquote_to_bytes(segment)
        if decoded in (b".", b"..") or b"/" in decoded or b"\\" in decoded:
            return True
        if any(c < 0x20 or c == 0x7F for c in decoded):
            return True
    return False


class Proxy:
    """The raw ASGI callable for /v1/*. Resources arrive via `bind()` at start-up."""

    def __init__(self) -> None:
        self.rt: Runtime | None = None
        self._throttle = Throttle()

    def bind(self, rt: Runtime) -> None:
        self.rt = rt
        key = rt.settings.upstream.api_key.get()
        self._provider_auth = f"Bearer {key}" if key else None
        self._base = rt.upstream_base.rstrip("/")
        self._prefix = rt.key_format.prefix_bytes
        self._max_body = rt.settings.server.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rt = self.rt
        if rt is None:
            await send_error(send, errors.ServiceUnavailable("edge is starting up."))
            return
        start = perf_counter()
        rt.metrics.inflight.inc()
        ex = _Exchange(receive)
        try:
            await self._handle(rt, scope, ex, send, start)
        except asyncio.CancelledError:
            if not ex.client_gone:
                raise
            if ex.task is not None:
                ex.task.uncancel()
        except Exception:
            log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            if not ex.started:
                await send_error(send, errors.EdgeError())
        finally:
            ex.stop()
            rt.metrics.inflight.dec()

    async def _handle(
        self, rt: Runtime, scope: Scope, ex: _Exchange, send: Send, start: float
    ) -> None:
        metrics = rt.metrics
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope["query_string"]
        inbound = inbound_headers(scope["headers"])
        bad = self._check_request(raw_path, query, inbound.length)
        if bad is not None:
            metrics.count(NO_PLAN, "bad_request")
            await send_error(send, bad)
            return

        token = bearer_token(inbound.auth) if inbound.auth is not None else None
        parsed = rt.key_format.parse(token) if token is not None else None
        if parsed is None:
            metrics.count(NO_PLAN, "unauthorized")
            await send_error(send, errors.InvalidApiKey())
            return

        try:
            decision = await rt.limiter.admit(parsed)
        except RedisUnavailable as exc:
            self._log_throttled("redis", "Redis unavailable (%s): %s", exc.kind, exc.detail)
            metrics.count(NO_PLAN, "unavailable")
            await send_error(send, exc)
            return
        if decision.code != ADMITTED:
            await self._reject(rt, decision, parsed.kid, send)
            return

        rest = raw_path[3:].decode("ascii")
        url = self._base + rest + ("?" + query.decode("ascii") if query else "")
        headers = inbound.headers
        if self._provider_auth is not None:
            headers.append(("Authorization", self._provider_auth))
        await self._forward(
            rt, scope["method"], url, headers, inbound.length, decision, ex, send, start
        )

    def _check_request(
        self, raw_path: bytes, query: bytes, length: bytes | None
    ) -> errors.EdgeError | None:
        """Bad input that needs no I/O to refuse."""
        if self._prefix in raw_path or self._prefix in query:
            return errors.BadRequest(
                "API keys belong in the Authorization header, never in the URL. This request was "
                "not forwarded; consider the key exposed and rotate it.",
                code="api_key_in_url",
            )
        if unsafe_path(raw_path):
            return errors.BadRequest("Invalid request path.", code="invalid_path")
        if not query.isascii():
            return errors.BadRequest("Invalid query string.", code="invalid_query")
        if length is not None:
            if not length.isdigit():
                return errors.BadRequest("Invalid Content-Length.")
            if int(length) > self._max_body:
                return self._too_large()
        return None

    def _too_large(self) -> errors.EdgeError:
        return errors.PayloadTooLarge(f"Request body is larger than {self._max_body} bytes.")

    async def _reject(self, rt: Runtime, d: Decision, kid: str, send: Send) -> None:
        metrics = rt.metrics
        plan = metrics.label(d.plan)
        code = d.code
        err: errors.EdgeError
        if code in (MINUTE_EMPTY, DAY_EMPTY):
            window = "minute" if code == MINUTE_EMPTY else "day"
            metrics.count(plan, f"rate_limited_{window}")
            err = errors.RateLimited(
                f"Rate limit reached: {d.rpm if code == MINUTE_EMPTY else d.rpd} requests per "
                f"{window} for this key. Retry after the time in the Retry-After header."
            )
            await send_error(send, err, rejection_headers(d))
        elif code == PAUSED:
            metrics.count(plan, "forbidden")
            await send_error(send, errors.PermissionDenied("This API key is paused."))
        elif code == PLAN_MISSING:
            log.error("key %s has plan %r, which is not configured", kid, d.plan)
            metrics.count(plan, "unavailable")
            err = errors.ServiceUnavailable(
                "This key's plan is not configured on this server.", code="config_error"
            )
            await send_error(send, err)
        else:
            metrics.count(plan if code in (REVOKED, EXPIRED) else NO_PLAN, "unauthorized")
            err = errors.InvalidApiKey()
            if code == EXPIRED:
                err = errors.InvalidApiKey("This API key has expired.", code="invalid_api_key")
            await send_error(send, err)

    async def _forward(
        self,
        rt: Runtime,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        length: bytes | None,
        decision: Decision,
        ex: _Exchange,
        send: Send,
        start: float,
    ) -> None:
        metrics = rt.metrics
        plan = metrics.label(decision.plan)
        first = await ex.receive()
        if first["type"] == "http.disconnect":
            return
        body: bytes = first.get("body", b"")
        data: Any
        if len(body) > self._max_body:
            metrics.count(plan, "bad_request")
            await send_error(send, self._too_large(), rate_limit_headers(decision))
            return
        if first.get("more_body", False):
            data = self._upload(ex, body)
            if length is not None:
                headers.append(("Content-Length", length.decode()))
        else:
            data = body if body or method not in BODYLESS else None
            ex.watch()

        sent = perf_counter()
        metrics.admission.observe(sent - start)
        outcome = "allowed"  # also when the client leaves first: it was admitted and sent
        try:
            resp = await rt.session.request(
                method, URL(url, encoded=True), headers=headers, data=data, allow_redirects=False
            )
        except Exception as exc:
            if ex.client_gone:
                return
            err = self._upstream_error(exc, ex)
            outcome = "bad_request" if err.status == 413 else "upstream_error"
            await send_error(send, err, rate_limit_headers(decision))
            return
        finally:
            metrics.count(plan, outcome)
        try:
            metrics.ttfb_by_plan[plan].observe(perf_counter() - sent)
            metrics.upstream_status(plan, resp.status)
            await self._relay(resp, decision, ex, send)
        finally:
            resp.close()

    async def _relay(
        self, resp: aiohttp.ClientResponse, decision: Decision, ex: _Exchange, send: Send
    ) -> None:
        out = response_headers(resp.raw_headers)
        out += rate_limit_headers(decision)
        ex.started = True
        await send({"type": "http.response.start", "status": resp.status, "headers": out})
        content = resp.content
        try:
            while chunk := await content.readany():
                if content.at_eof():  # the last chunk: send it as the end of the body
                    ex.stop()
                    await send({"type": "http.response.body", "body": chunk, "more_body": False})
                    resp.release()
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (TimeoutError, aiohttp.ClientError) as exc:
            # The client must be able to tell a cut answer from a whole one: end the response
            # without its final chunk, and uvicorn closes the connection.
            ex.stop()
            log.warning(
                "upstream stream cut mid-way (%s); ending the client's stream", _describe(exc)
            )
            return
        ex.stop()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        resp.release()

    async def _upload(self, ex: _Exchange, first: bytes) -> AsyncIterator[bytes]:
        """Stream the request body up as it arrives, enforcing the size limit."""
        total = len(first)
        if first:
            yield first
        while True:
            msg = await ex.receive()
            if msg["type"] == "http.disconnect":
                ex.client_gone = True
                raise _ClientGone
            chunk: bytes = msg.get("body", b"")
            total += len(chunk)
            if total > self._max_body:
                ex.too_large = True
                raise _BodyTooLarge
            if chunk:
                yield chunk
            if not msg.get("more_body", False):
                break
        ex.watch()

    def _upstream_error(self, exc: Exception, ex: _Exchange) -> errors.EdgeError:
        if ex.too_large:
            return self._too_large()
        if isinstance(exc, TimeoutError):  # aiohttp's connect and read timeouts included
            self._log_throttled("upstream-timeout", "upstream timed out: %s", _describe(exc))
            return errors.UpstreamTimeout()
        self._log_throttled("upstream-error", "upstream unreachable: %s", _describe(exc))
        return errors.UpstreamUnreachable()

    def _log_throttled(self, key: str, msg: str, *args: object) -> None:
        ok, suppressed = self._throttle.allow(key)
        if ok:
            suffix = f" ({suppressed} more since the last line)" if suppressed else ""
            log.warning(msg + suffix, *args)


def response_headers(raw: tuple[tuple[bytes, bytes], ...]) -> Headers:
    """The upstream's response headers minus hop-by-hop ones (RFC 9110 §7.6.1) and those edge
    replaces; names lower-cased, values untouched."""
    out: Headers = []
    listed: set[bytes] | None = None
    for name, value in raw:
        lname = name.lower()
        if lname in RESPONSE_DROP or lname.startswith(b"x-ratelimit-"):
            if lname == b"connection":
                listed = (listed or set()) | {t.strip().lower() for t in value.split(b",")}
            continue
        out.append((lname, value))
    if listed:
        out = [(n, v) for n, v in out if n not in listed]
    return out


def _describe(exc: BaseException) -> str:
    """An exception's class and message, without a URL's query string."""
    text = str(exc).split("?", 1)[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
