"""edge's errors and the one place that turns an error into an HTTP answer.

Every answer edge's own code gives is OpenAI's error shape, as JSON:
`{"error": {"message": ..., "type": ..., "param": null, "code": ...}}`.

    EdgeError                      500 server_error / internal_error; the message is safe to show
    ├── BadRequest                 400 invalid_request_error
    ├── InvalidApiKey              401 invalid_request_error / invalid_api_key
    ├── AdminTokenInvalid          401 invalid_request_error / invalid_admin_token
    ├── InsufficientBalance        402 insufficient_balance / insufficient_balance
    ├── PermissionDenied           403 permission_error / insufficient_permissions
    ├── NotFound, MethodNotAllowed 404 / 405 invalid_request_error
    ├── RequestTimeout             408 invalid_request_error / request_timeout
    ├── Conflicting                409 invalid_request_error / conflict (admin)
    ├── PayloadTooLarge            413 invalid_request_error / request_too_large
    ├── Unprocessable              422 invalid_request_error / invalid_value (admin)
    ├── RateLimited                429 rate_limit_error / rate_limit_exceeded
    ├── HeadersTooLarge            431 invalid_request_error / request_header_fields_too_large
    ├── UpstreamUnreachable        502 upstream_error / upstream_unreachable
    │   └── BadUpstreamResponse    502 upstream_error / bad_upstream_response
    ├── ServiceUnavailable         503 service_unavailable (Redis away, plan missing, starting)
    │   ├── RedisUnavailable       503, with the failure's kind for edge_redis_errors_total
    │   └── UpstreamBusy           503 / upstream_busy: every upstream connection busy
    └── UpstreamTimeout            504 upstream_error

Messages follow OpenAI's wording where OpenAI has one, because client libraries classify
errors by it: LiteLLM, for one, treats a 401 as an authentication error only when its message
contains "Incorrect API key provided". They never echo a key, a secret or a header value.

Third-party exceptions are translated once, at their boundary: Redis's in `redis/failures.py`,
the upstream client's in `proxy/handler.py`. The control plane's own exceptions (`StoreError`
and its kin in `control/store.py`) are operator messages the admin API maps onto 404 / 409 /
422. `send_error` (raw ASGI) and `error_response` (Starlette) render them all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from starlette.responses import Response

Headers = list[tuple[bytes, bytes]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class EdgeError(Exception):
    status = 500
    type = "server_error"
    code: str | None = "internal_error"
    message = "The server had an error processing your request. Sorry about that! It was logged."

    def __init__(
        self, message: str | None = None, *, code: str | None = None, param: str | None = None
    ) -> None:
        if message is not None:
            self.message = message
        if code is not None:
            self.code = code
        self.param = param
        super().__init__(self.message)

    def body(self) -> bytes:
        return render(self.message, self.type, self.code, self.param)


class BadRequest(EdgeError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class AdminTokenInvalid(EdgeError):
    status, type, code = 401, "invalid_request_error", "invalid_admin_token"
    message = "Incorrect admin token provided. Send it as 'Authorization: Bearer <admin.token>'."


class InvalidApiKey(EdgeError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"
    message = (
        "Incorrect API key provided. Send the key exactly as it was issued to you, in the "
        "header 'Authorization: Bearer <key>'."
    )


class InsufficientBalance(EdgeError):
    status, type, code = 402, "insufficient_balance", "insufficient_balance"
    message = "This API key has no credits left. Ask for a top-up to continue."


class PermissionDenied(EdgeError):
    status, type, code = 403, "permission_error", "insufficient_permissions"
    message = "You have insufficient permissions for this operation."


class NotFound(EdgeError):
    status, type, code = 404, "invalid_request_error", "not_found"
    message = "Invalid URL. The API lives under /v1/."


class ModelNotFound(EdgeError):
    """Several upstreams are configured and none serves the request's model (OpenAI's words)."""

    status, type, code = 404, "invalid_request_error", "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist or you do not have access to it.")


class MethodNotAllowed(EdgeError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"
    message = "Method not allowed on this URL."


class RequestTimeout(EdgeError):
    status, type, code = 408, "invalid_request_error", "request_timeout"
    message = "The request headers did not arrive in time."


class Conflicting(EdgeError):
    """The admin API: the key's state forbids the change (revoked, owner at the cap, …)."""

    status, type, code = 409, "invalid_request_error", "conflict"


class PayloadTooLarge(EdgeError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class Unprocessable(EdgeError):
    """The admin API: a request body or query that does not validate; `param` names it."""

    status, type, code = 422, "invalid_request_error", "invalid_value"


class HeadersTooLarge(EdgeError):
    status, type, code = 431, "invalid_request_error", "request_header_fields_too_large"


class RateLimited(EdgeError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class UpstreamUnreachable(EdgeError):
    status, type, code = 502, "upstream_error", "upstream_unreachable"
    message = "Bad gateway: the upstream API could not be reached. You can retry your request."


class BadUpstreamResponse(UpstreamUnreachable):
    code = "bad_upstream_response"
    message = (
        "Bad gateway: the upstream API's answer could not be relayed (not a valid HTTP "
        "response, or one edge does not pass on). You can retry your request."
    )


class ServiceUnavailable(EdgeError):
    status, type, code = 503, "service_unavailable", "service_unavailable"
    message = (
        "The server is not ready yet: edge cannot check API keys right now. You can retry "
        "your request shortly."
    )


class UpstreamBusy(ServiceUnavailable):
    code = "upstream_busy"
    message = (
        "Too many requests are waiting for the upstream API on this server. You can retry your "
        "request shortly."
    )


class RedisUnavailable(ServiceUnavailable):
    """Redis did not answer usefully; `kind` is timeout, connection, noscript or other (the
    label of edge_redis_errors_total). Raised by `redis/failures.py`, the one translation."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__()
        self.kind = kind
        self.detail = detail


class UpstreamTimeout(EdgeError):
    status, type, code = 504, "upstream_error", "upstream_timeout"
    message = "Gateway timeout: the upstream API did not answer in time."


@lru_cache(maxsize=512)
def render(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    """OpenAI's error JSON; cached, since most of edge's messages are a small fixed set."""
    error = {"message": message, "type": type_, "param": param, "code": code}
    return orjson.dumps({"error": error})


def _headers(body: bytes, extra: Headers | None) -> Headers:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    return headers + extra if extra else headers


async def send_error(send: Send, err: EdgeError, extra: Headers | None = None) -> None:
    """Answer a raw ASGI request with `err`."""
    body = err.body()
    headers = _headers(body, extra)
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def error_response(err: EdgeError, extra: Headers | None = None) -> Response:
    """`err` as a Starlette response (the control plane's handlers)."""
    from starlette.responses import Response  # lazy: the CLI renders no responses

    body = err.body()
    response = Response(body, status_code=err.status)
    response.raw_headers = _headers(body, extra)
    return response


def status_error(status: int) -> EdgeError:
    """The JSON error for an HTTP status raised by the framework (404, 405, …)."""
    if status == 404:
        return NotFound()
    if status == 405:
        return MethodNotAllowed()
    err = EdgeError(f"HTTP {status}", code="http_error")
    err.status = status
    err.type = "invalid_request_error" if status < 500 else "server_error"
    return err
