"""edge's errors and their one renderer.

Every answer edge's own code gives is OpenAI's error shape, as JSON:
`{"error": {"message": ..., "type": ..., "param": null, "code": ...}}`.

    EdgeError                     status, type, code; the message is safe to show
    ├── BadRequest                400 invalid_request_error
    ├── InvalidApiKey             401 invalid_request_error / invalid_api_key
    ├── PermissionDenied          403 permission_error / insufficient_permissions
    ├── NotFound, MethodNotAllowed 404 / 405 invalid_request_error
    ├── PayloadTooLarge           413 invalid_request_error / request_too_large
    ├── RateLimited               429 rate_limit_error / rate_limit_exceeded
    ├── UpstreamUnreachable       502 upstream_error
    ├── ServiceUnavailable        503 service_unavailable (Redis away, plan missing)
    └── UpstreamTimeout           504 upstream_error

Third-party exceptions are translated where they arise (redis in `scripts.py`, aiohttp in
`proxy.py`); messages never carry a key, a secret or a header value from the request.
"""

from __future__ import annotations

from functools import lru_cache

import orjson


class EdgeError(Exception):
    status = 500
    type = "server_error"
    code: str | None = "internal_error"
    message = "edge could not handle this request; the error was logged"

    def __init__(self, message: str | None = None, *, code: str | None = None) -> None:
        if message is not None:
            self.message = message
        if code is not None:
            self.code = code
        super().__init__(self.message)

    def body(self) -> bytes:
        return render(self.message, self.type, self.code)


class BadRequest(EdgeError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class InvalidApiKey(EdgeError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"
    message = (
        "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>' with the key "
        "exactly as it was issued."
    )


class PermissionDenied(EdgeError):
    status, type, code = 403, "permission_error", "insufficient_permissions"


class NotFound(EdgeError):
    status, type, code = 404, "invalid_request_error", "not_found"
    message = "Unknown path. The API lives under /v1/."


class MethodNotAllowed(EdgeError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"
    message = "Method not allowed on this path."


class PayloadTooLarge(EdgeError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class RateLimited(EdgeError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class UpstreamUnreachable(EdgeError):
    status, type, code = 502, "upstream_error", "upstream_unreachable"
    message = "The upstream API could not be reached. Try again later."


class ServiceUnavailable(EdgeError):
    status, type, code = 503, "service_unavailable", "service_unavailable"
    message = "edge is temporarily unable to check API keys. Try again shortly."


class UpstreamTimeout(EdgeError):
    status, type, code = 504, "upstream_error", "upstream_timeout"
    message = "The upstream API did not answer in time."


@lru_cache(maxsize=256)
def render(message: str, type_: str, code: str | None) -> bytes:
    """OpenAI's error JSON; cached, since edge's messages are a small fixed set."""
    error = {"message": message, "type": type_, "param": None, "code": code}
    return orjson.dumps({"error": error})


def status_error(status: int) -> EdgeError:
    """The JSON error for an HTTP status raised by the framework (404, 405, …)."""
    if status == 404:
        return NotFound()
    if status == 405:
        return MethodNotAllowed()
    err = EdgeError(f"HTTP {status}")
    err.status = status
    err.type = "invalid_request_error" if status < 500 else "server_error"
    err.code = None
    return err
