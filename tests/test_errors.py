"""edge/errors.py: the error family, its one renderer, and OpenAI's wording. No I/O."""

from __future__ import annotations

import orjson

from edge import errors


def test_errors_have_openai_shape() -> None:
    for err in (
        errors.InvalidApiKey(),
        errors.PermissionDenied("paused"),
        errors.RateLimited("slow down"),
        errors.ServiceUnavailable(),
        errors.UpstreamUnreachable(),
        errors.UpstreamTimeout(),
        errors.PayloadTooLarge("big"),
        errors.status_error(404),
        errors.status_error(405),
        errors.status_error(418),
    ):
        body = orjson.loads(err.body())
        assert set(body) == {"error"}
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["param"] is None
        assert body["error"]["message"]
        assert body["error"]["type"] == err.type and body["error"]["code"] == err.code


def test_error_statuses_and_codes() -> None:
    assert (errors.InvalidApiKey.status, errors.InvalidApiKey.code) == (401, "invalid_api_key")
    assert errors.PermissionDenied.type == "permission_error"
    assert errors.RateLimited.code == "rate_limit_exceeded"
    assert errors.ServiceUnavailable.type == "service_unavailable"
    assert errors.UpstreamUnreachable.status == 502 and errors.UpstreamTimeout.status == 504
    assert errors.UpstreamTimeout.type == errors.UpstreamUnreachable.type == "upstream_error"


def test_401s_use_openais_phrase_so_clients_classify_them() -> None:
    """LiteLLM maps a 401 to AuthenticationError only when it says this (see errors.py)."""
    from edge.proxy.admission import Code, Decision, rejection
    from edge.proxy.handler import NO_KEY

    messages = [errors.InvalidApiKey().message, NO_KEY]
    messages += [rejection(Decision(c, "free")).error.message for c in (1, 2, 3)]
    assert all("Incorrect API key provided" in m for m in messages)
    assert rejection(Decision(Code.UNKNOWN, "")).error.status == 401


def test_no_message_says_request_too_large() -> None:
    """LiteLLM reads "Request too large" as a rate limit (a 413 is not one)."""
    big = errors.PayloadTooLarge("x")
    assert "Request too large" not in big.message
    from edge.proxy.policy import TargetPolicy

    assert "Request too large" not in TargetPolicy("gw_sk_", 10).too_large().message


def test_error_response_and_param() -> None:
    err = errors.BadRequest("bad rpm", code="invalid_value", param="rpm")
    response = errors.error_response(err, [(b"x-extra", b"1")])
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-extra"] == "1"
    assert int(response.headers["content-length"]) == len(response.body)
    assert orjson.loads(response.body)["error"]["param"] == "rpm"


async def test_send_error_speaks_raw_asgi() -> None:
    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    await errors.send_error(send, errors.UpstreamTimeout(), [(b"retry-after", b"1")])
    start, body = sent
    assert start["status"] == 504
    assert (b"retry-after", b"1") in start["headers"]  # type: ignore[operator]
    assert orjson.loads(body["body"])["error"]["type"] == "upstream_error"  # type: ignore[arg-type]
