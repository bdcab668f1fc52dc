"""Health endpoints: `/healthz` says the process is alive, `/readyz` that it can serve: not
draining (SIGTERM makes it 503 at once) and Redis answering.

Readiness asks the request path's own Redis client (a PING within `redis.timeout`), so an
instance whose requests would fail is taken out of the load balancer, whatever the admin
client thinks.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response

from edge.errors import ServiceUnavailable, error_response
from edge.redis.failures import FAILURES, error_kind
from edge.runtime import Runtime

JSON = "application/json"


async def healthz(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type=JSON)


async def readyz(request: Request) -> Response:
    rt: Runtime | None = getattr(request.app.state, "runtime", None)
    if rt is None:
        return error_response(ServiceUnavailable("not ready: starting", code="starting"))
    if request.app.state.edge.draining:
        return error_response(ServiceUnavailable("not ready: draining", code="draining"))
    try:
        async with asyncio.timeout(rt.settings.redis.timeout):
            await rt.hot.ping()
    except FAILURES as exc:
        rt.metrics.redis_error[error_kind(exc)].inc()
        return error_response(ServiceUnavailable("not ready: Redis is unreachable", code="redis"))
    return Response(b'{"status":"ready"}', media_type=JSON)
