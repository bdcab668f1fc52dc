"""The admin API, `/admin/*`: key management over HTTP, a thin face over `store.py`.

Mounted only when `admin.token` is set (otherwise `/admin/*` is the control plane's JSON 404).
Every request carries `Authorization: Bearer <admin.token>`, compared in constant time. Each
handler parses one validated request model (`key_specs`), calls one store function and renders
the record; every answer, errors included, is JSON in OpenAI's error shape.

    POST   /admin/keys                 create: 201, the record plus `key` (its only showing)
    GET    /admin/keys                 ?owner=&status=&cursor=&limit= → {data, next_cursor}
    GET    /admin/keys/{id}            one record
    PATCH  /admin/keys/{id}            name, owner, plan, rpm, rpd, tpm, tpd, scopes, expires_at,
                                       credits
    POST   /admin/keys/{id}/pause|resume|revoke
    POST   /admin/keys/{id}/rotate     {grace_seconds} → the record plus the new `key`
    POST   /admin/keys/{id}/credits    {delta}: atomic, never below 0
    GET    /admin/keys/{id}/usage      ?from=&to=&granularity=day|hour → {data, totals}
    GET    /admin/usage                ?owner=&from=&to=&granularity= → summed over keys
    GET    /admin/usage/top            ?date=&limit= → the busiest keys of a day
    GET    /admin/plans                the plan table
    GET    /admin/pricing              credits per request, and per million tokens by model
    GET    /admin/audit                ?cursor=&limit=&key= → {data, next_cursor}, newest first
    GET    /admin/                     the dashboard (static files from edge/control/admin_ui)
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from datetime import date
from importlib import resources
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route, Router
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge import errors
from edge.control.leaks import CallLimit, check_leaks
from edge.control.records import KeyRecord, plan_rows, pricing_rows
from edge.control.specs import (
    AuditQuery,
    CreditChange,
    KeyUpdate,
    LeakReport,
    ListQuery,
    NewKey,
    Rotation,
    TopQuery,
    UsageQuery,
    explain,
)
from edge.control.store import Conflict, KeyNotFound, KeyStore, StoreError
from edge.control.usage import summed, total, zeros
from edge.errors import RedisUnavailable
from edge.settings import ConfigError, Settings

log = logging.getLogger("edge.control.admin_api")
Spec = TypeVar("Spec", bound=BaseModel)
Handler = Callable[[Request, KeyStore], Awaitable[Response]]
Reload = Callable[[str], Awaitable[list[str]]]  # the actor → the sections it changed
MAX_BODY = 64 * 1024


def json(value: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(value), status_code=status, media_type="application/json")


def record(rec: KeyRecord, status: int = 200, key: str | None = None) -> Response:
    body = rec.to_dict()
    return json({**body, "key": key} if key else body, status)


class AdminApi:
    """The `/admin` routes over one store; `token` is the admin token's value."""

    def __init__(self, store: KeyStore, token: str, reload: Reload | None = None) -> None:
        self.store = store
        self._token = token.encode()
        self._reload = reload
        self._leak_calls = CallLimit()
        self.router = Router(
            routes=[
                Route("/keys", self._wrap(create), methods=["POST"]),
                Route("/keys", self._wrap(listing), methods=["GET"]),
                Route("/keys/{id}", self._wrap(show), methods=["GET"]),
                Route("/keys/{id}", self._wrap(update), methods=["PATCH"]),
                Route("/keys/{id}/pause", self._wrap(status("paused")), methods=["POST"]),
                Route("/keys/{id}/resume", self._wrap(status("active")), methods=["POST"]),
                Route("/keys/{id}/revoke", self._wrap(status("revoked")), methods=["POST"]),
                Route("/keys/{id}/rotate", self._wrap(rotate), methods=["POST"]),
                Route("/keys/{id}/credits", self._wrap(credits), methods=["POST"]),
                Route("/keys/{id}/usage", self._wrap(key_usage), methods=["GET"]),
                Route("/usage", self._wrap(usage_sum), methods=["GET"]),
                Route("/usage/top", self._wrap(usage_top), methods=["GET"]),
                Route("/plans", self._wrap(plans), methods=["GET"]),
                Route("/pricing", self._wrap(pricing), methods=["GET"]),
                Route("/audit", self._wrap(audit), methods=["GET"]),
                Route("/reload", self._wrap(self._reloaded), methods=["POST"]),
                Route("/leaks", self._wrap(self._leaks), methods=["POST"]),
                # the dashboard: static, public; everything it shows comes from the API above
                Route("/", dashboard, methods=["GET", "HEAD"]),
                Mount("/ui", app=StaticFiles(packages=[("edge.control", "admin_ui")])),
            ]
        )
        self.app = SecurityHeaders(self.router)

    def _wrap(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """Admin auth, then the handler, with store and Redis errors as JSON answers."""

        async def endpoint(request: Request) -> Response:
            if not self._authorized(request):
                return errors.error_response(errors.AdminTokenInvalid())
            try:
                return await handler(request, self.store)
            except errors.EdgeError as exc:  # Redis unavailable, too large, invalid input
                if isinstance(exc, RedisUnavailable):
                    log.warning("admin API: Redis unavailable (%s): %s", exc.kind, exc.detail)
                return errors.error_response(exc)
            except KeyNotFound as exc:
                return errors.error_response(errors.NotFound(str(exc)))
            except Conflict as exc:
                return errors.error_response(errors.Conflicting(str(exc)))
            except StoreError as exc:
                return errors.error_response(errors.Unprocessable(str(exc)))

        return endpoint

    async def _reloaded(self, request: Request, store: KeyStore) -> Response:
        """`POST /admin/reload`: read the configuration again and apply it (edge/reload.py)."""
        if self._reload is None:
            raise errors.ServiceUnavailable("This edge cannot reload its configuration.")
        try:
            changed = await self._reload(actor(request))
        except ConfigError as exc:
            raise errors.Unprocessable(str(exc), code="invalid_config") from None
        return json({"reloaded": True, "changed": changed})

    async def _leaks(self, request: Request, store: KeyStore) -> Response:
        """`POST /admin/leaks`: a secret scanner's report (control/leaks.py)."""
        self._leak_calls.check()
        report = await body(request, LeakReport, store)
        data = await check_leaks(store, report.candidates, report.source, actor(request))
        return json({"data": data})

    def _authorized(self, request: Request) -> bool:
        value = request.headers.get("authorization", "")
        scheme, _, token = value.partition(" ")
        presented = token.encode("utf-8", "replace")
        return scheme.lower() == "bearer" and hmac.compare_digest(presented, self._token)


# Every /admin answer: the dashboard runs only its own files (no inline script, no framing),
# and nothing from the admin plane is cached or leaks a referrer.
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        b"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        b"frame-ancestors 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response of the wrapped ASGI app."""

    def __init__(self, app: ASGIApp) -> None:
        self.inner = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in SECURITY_HEADERS}
                kept = [(n, v) for n, v in message.get("headers", []) if n not in names]
                message["headers"] = kept + SECURITY_HEADERS
            await send(message)

        await self.inner(scope, receive, with_headers)


async def dashboard(request: Request) -> Response:
    page = resources.files("edge.control").joinpath("admin_ui", "index.html").read_bytes()
    return Response(page, media_type="text/html; charset=utf-8")


def actor(request: Request) -> str:
    client = request.client
    return f"admin-api {client.host}" if client else "admin-api"


async def body(request: Request, model: type[Spec], store: KeyStore) -> Spec:
    """The request body as `model`; 413 past MAX_BODY, 422 naming the field otherwise."""
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise errors.PayloadTooLarge(f"The request body is larger than {MAX_BODY} bytes.")
    try:
        return model.model_validate_json(raw or b"{}", strict=True, context=store.plans)
    except ValidationError as exc:
        message, param = explain(exc)
        raise errors.Unprocessable(message, param=param) from None


async def create(request: Request, store: KeyStore) -> Response:
    key, rec = await store.create(await body(request, NewKey, store), actor(request))
    return record(rec, 201, key)


def query_of(request: Request, model: type[Spec]) -> Spec:
    """The query string as `model`; 422 naming the parameter otherwise."""
    try:
        return model.model_validate(dict(request.query_params))
    except ValidationError as exc:
        message, param = explain(exc)
        raise errors.Unprocessable(message, param=param) from None


async def listing(request: Request, store: KeyStore) -> Response:
    query = query_of(request, ListQuery)
    try:
        page = await store.list_page(query.owner, query.status, query.cursor, query.limit)
    except ValueError as exc:
        raise errors.Unprocessable(f"cursor: {exc}", param="cursor") from None
    data = [r.to_dict() for r in page.records]
    return json({"object": "list", "data": data, "next_cursor": page.next_cursor})


async def show(request: Request, store: KeyStore) -> Response:
    return record(await store.get(request.path_params["id"]))


async def update(request: Request, store: KeyStore) -> Response:
    change = await body(request, KeyUpdate, store)
    return record(await store.update(request.path_params["id"], change, actor(request)))


def status(new: str) -> Handler:
    async def handler(request: Request, store: KeyStore) -> Response:
        return record(await store.set_status(request.path_params["id"], new, actor(request)))

    return handler


async def rotate(request: Request, store: KeyStore) -> Response:
    rotation = await body(request, Rotation, store)
    kid = request.path_params["id"]
    key, rec = await store.rotate(kid, rotation.grace_seconds, actor(request))
    return record(rec, 200, key)


async def credits(request: Request, store: KeyStore) -> Response:
    change = await body(request, CreditChange, store)
    return record(await store.add_credits(request.path_params["id"], change.delta, actor(request)))


async def _span(query: UsageQuery, store: KeyStore) -> tuple[date, date]:
    try:
        return query.span(await store.usage.today())
    except ValueError as exc:
        raise errors.Unprocessable(str(exc), param="from") from None


def _history(query: UsageQuery, first: date, last: date, rows: list[dict[str, Any]]) -> Any:
    return {
        "object": "list",
        "granularity": query.granularity,
        "from": first.isoformat(),
        "to": last.isoformat(),
        "data": rows,
        "totals": total(rows),
    }


async def key_usage(request: Request, store: KeyStore) -> Response:
    query = query_of(request, UsageQuery)
    if query.owner is not None:
        raise errors.Unprocessable("owner: unknown field", param="owner")
    rec = await store.get(request.path_params["id"])
    first, last = await _span(query, store)
    [rows] = await store.usage.of_keys([rec.id], first, last, query.granularity)
    return json({"key": rec.id, **_history(query, first, last, rows)})


async def usage_sum(request: Request, store: KeyStore) -> Response:
    query = query_of(request, UsageQuery)
    first, last = await _span(query, store)
    owner = query.owner or None  # `?owner=` (empty): every key
    kids = [rec.id for rec in await store.all_keys(owner)]
    per_key = await store.usage.of_keys(kids, first, last, query.granularity)
    rows = summed(per_key) if kids else zeros(first, last, query.granularity)
    summary = {"owner": owner, "keys": len(kids)}
    return json({**summary, **_history(query, first, last, rows)})


async def usage_top(request: Request, store: KeyStore) -> Response:
    query = query_of(request, TopQuery)
    day = query.day or await store.usage.today()
    records = await store.all_keys()
    per_key = await store.usage.of_keys([r.id for r in records], day, day, "day")
    ranked = sorted(
        ((rows[0], rec) for rows, rec in zip(per_key, records, strict=True) if any(
            rows[0][name] for name in ("requests", "rate_limited", "rejected")
        )),
        key=lambda pair: (-pair[0]["requests"], -pair[0]["credits"]),
    )  # fmt: skip
    data = [
        {"id": rec.id, "name": rec.name, "owner": rec.owner, "plan": rec.plan, **row}
        for row, rec in ranked[: query.limit]
    ]
    return json({"object": "list", "date": day.isoformat(), "data": data})


async def plans(request: Request, store: KeyStore) -> Response:
    return json({"object": "list", "data": plan_rows(store.settings)})


async def pricing(request: Request, store: KeyStore) -> Response:
    return json(pricing_rows(store.settings))


async def audit(request: Request, store: KeyStore) -> Response:
    query = query_of(request, AuditQuery)
    try:
        entries, cursor = await store.audit.page(query.cursor, query.limit, query.key)
    except ValueError as exc:
        raise errors.Unprocessable(f"cursor: {exc}", param="cursor") from None
    return json({"object": "list", "data": entries, "next_cursor": cursor})


def admin_enabled(settings: Settings) -> bool:
    return bool(settings.admin.token.get_secret_value())
