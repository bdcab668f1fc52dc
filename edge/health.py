"""Health endpoints: `/healthz` says the process is alive, `/readyz` that it can serve
(Redis answers a PING within its deadline)."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response

from edge.errors import ServiceUnavailable
from edge.runtime import Runtime
from edge.scripts import error_kind

JSON = "application/json"


async def healthz(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type=JSON)


async def readyz(request: Request) -> Response:
    rt: Runtime | None = getattr(request.app.state, "runtime", None)
    if rt is None:
        return _unready("starting")
    try:
        async with asyncio.timeout(rt.settings.redis.timeout * 2):
            await rt.redis.ping()
    except Exception as exc:
        rt.metrics.redis_error[error_kind(exc)].inc()
        return _unready("redis")
    return Response(b'{"status":"ready"}', media_type=JSON)


def _unready(reason: str) -> Response:
    err = ServiceUnavailable(f"not ready: {reason}")
    return Response(err.body(), status_code=503, media_type=JSON)
