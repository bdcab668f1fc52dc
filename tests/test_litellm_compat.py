"""LiteLLM's Python client works against edge and reads edge's errors as OpenAI's.

Beside test_openai_sdk.py. LiteLLM (`litellm.completion` / `litellm.acompletion`, provider
`openai/…`, `api_base` = `{edge.url}/v1`) does not go by the status code alone: its exception
mapping (litellm/litellm_core_utils/exception_mapping_utils.py, `openai` branch) reads the
error's text first. Text with `invalid_request_error` but without OpenAI's "Incorrect API key
provided" becomes `BadRequestError`, whatever the status; "rate limit" or a standalone "429"
becomes `RateLimitError`, and so does "Request too large" (checked after the
`invalid_request_error` rule); "Request timed out" or "A timeout occurred" becomes `Timeout`.
Only then does the status decide: 401 AuthenticationError, 429 RateLimitError, 502
BadGatewayError, 503 ServiceUnavailableError, 504 Timeout. That branch has no case for 403: a
paused key surfaces as the generic `litellm.APIError`, status 403.

Which text LiteLLM reads depends on the OpenAI SDK installed beside it: `str()` of the SDK's
error. openai>=3 (pinned here) puts only `error.message` there; openai<3, which many LiteLLM
releases require, puts the whole body, `type` included, so every 401 of edge says
`invalid_request_error` to LiteLLM. The end-to-end tests run the real client with the pinned SDK;
the `sdk_2` tests hand LiteLLM's mapping edge's real answers worded as openai<3 words them (what
the real client with openai 2.x raises, class and message alike).

Every error test also checks that the key does not appear in what the exception says.

LiteLLM is imported once for the module, offline: the model cost map from the copy it ships
(`LITELLM_LOCAL_MODEL_COST_MAP`), no `.env` read from the working directory (`LITELLM_MODE`).
"""

from __future__ import annotations

import asyncio
import importlib
import secrets
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis

from edge import errors, keys
from edge.control.records import KeyRecord
from edge.keys import record_key
from tests.support.edge_process import PROVIDER_KEY, EdgeProcess, auth
from tests.support.fake_upstream import FakeUpstream
from tests.support.keys import store_call
from tests.support.redis_server import RedisServer

MakeKey = Callable[..., tuple[str, KeyRecord]]
SdkText = Callable[[int, dict[str, Any]], str]

MESSAGES = [{"role": "user", "content": "hi"}]

OFFLINE_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # else `import litellm` fetches it from GitHub
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",  # the same for its Anthropic header table
    "LITELLM_MODE": "PRODUCTION",  # "DEV" (the default) loads ./.env into os.environ
}


def sdk_2_text(status: int, body: dict[str, Any]) -> str:
    """`str()` of an openai<3 APIStatusError: the whole JSON body, as a Python dict."""
    return f"Error code: {status} - {body}"


def sdk_3_text(status: int, body: dict[str, Any]) -> str:
    """`str()` of an openai>=3 APIStatusError: the body's `error.message` only."""
    return f"Error code: {status} - {body['error']['message']}"


@pytest.fixture(scope="module")
def litellm() -> Iterator[ModuleType]:
    """The `litellm` module, imported (seconds) once, without the network."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in OFFLINE_ENV.items():
            mp.setenv(name, value)
        module = importlib.import_module("litellm")
        mp.setattr(module, "suppress_debug_info", True)  # no "Give Feedback" banner on errors
        yield module


@pytest.fixture
def sync_loop() -> Iterator[None]:
    """An event loop for LiteLLM's sync calls, closed afterwards.

    A sync `litellm.completion` runs its timing hook on `asyncio.get_event_loop()`, which in the
    main thread creates a loop that nobody closes; garbage-collected during a later test, it
    fails that test with a ResourceWarning. Given one, LiteLLM uses it and this closes it.
    """
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield
    asyncio.set_event_loop(None)
    loop.close()


@pytest.fixture(params=["well-formed-unknown", "malformed", "random-string", "revoked", "expired"])
def bad_key(
    request: pytest.FixtureRequest, make_key: MakeKey, redis_server: RedisServer, r: redis.Redis
) -> str:
    """A key edge answers 401 to, each kind edge tells apart."""
    kind: str = request.param
    if kind == "well-formed-unknown":
        return keys.make_key("gw_sk_", keys.new_kid())
    if kind == "malformed":
        return "gw_sk_not-a-real-key"
    if kind == "random-string":
        return secrets.token_urlsafe(24)
    key, rec = make_key(expires_in=3600)
    if kind == "revoked":
        store_call(redis_server.url, lambda store: store.set_status(rec.id, "revoked", "test"))
    else:
        r.hset(record_key(rec.id), "expires", int(r.time()[0]))
    return key


@pytest.fixture
def paused_key(make_key: MakeKey, redis_server: RedisServer) -> str:
    key, rec = make_key()
    store_call(redis_server.url, lambda store: store.set_status(rec.id, "paused", "test"))
    return key


def call_args(edge: EdgeProcess, key: str) -> dict[str, Any]:
    return {
        "model": "openai/m",
        "messages": MESSAGES,
        "api_base": f"{edge.url}/v1",
        "api_key": key,
        "num_retries": 0,
        "max_retries": 0,
        "timeout": 10,
    }


def chat(edge: EdgeProcess, key: str) -> httpx.Response:
    """What edge answers a chat completion with `key`, read without any SDK."""
    body = {"model": "m", "messages": MESSAGES}
    return httpx.post(f"{edge.url}/v1/chat/completions", headers=auth(key), json=body, timeout=10)


def mapped(status: int, body: dict[str, Any], sdk_text: SdkText) -> openai.APIError:
    """What `litellm.completion(model="openai/…")` raises for this error answer: its OpenAI
    handler wraps `str()` of the SDK's error in OpenAIError and hands it to exception_type.
    Call it from tests that take the `litellm` fixture (the import must happen offline)."""
    mapping = importlib.import_module("litellm.litellm_core_utils.exception_mapping_utils")
    common = importlib.import_module("litellm.llms.openai.common_utils")
    original = common.OpenAIError(status_code=status, message=sdk_text(status, body), body=body)
    with pytest.raises(openai.APIError) as caught:  # every LiteLLM error derives from it
        mapping.exception_type(model="m", original_exception=original, custom_llm_provider="openai")
    return caught.value


def status_code(exc: BaseException) -> Any:
    """LiteLLM's errors all carry `status_code`; openai.APIError, their common base, does not."""
    return getattr(exc, "status_code", None)


def assert_key_not_in(exc: BaseException, key: str) -> None:
    assert key not in str(exc)
    assert key not in repr(exc)
    assert key not in str(getattr(exc, "message", ""))


def assert_upstream_saw(upstream: FakeUpstream, *paths: str) -> None:
    assert [r.path for r in upstream.records] == list(paths)
    for record in upstream.records:
        assert record.headers("authorization") == [f"Bearer {PROVIDER_KEY}"]


@pytest.mark.usefixtures("sync_loop")
def test_litellm_completion(
    litellm: ModuleType, edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key()
    response = litellm.completion(**call_args(edge, key))

    assert response.choices[0].finish_reason == "stop"
    assert (response.choices[0].message.content or "").endswith("You said: hi")
    assert_upstream_saw(upstream, "/v1/chat/completions")


@pytest.mark.usefixtures("sync_loop")
def test_litellm_completion_stream(
    litellm: ModuleType, edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key()
    deltas: list[str] = []
    finish_reasons: list[str | None] = []
    for chunk in litellm.completion(**call_args(edge, key), stream=True):
        deltas.append(chunk.choices[0].delta.content or "")
        finish_reasons.append(chunk.choices[0].finish_reason)

    assert len(deltas) > 2
    assert "".join(deltas).strip().endswith("You said: hi")
    assert "stop" in finish_reasons
    assert_upstream_saw(upstream, "/v1/chat/completions")
    assert upstream.records[0].completed


async def test_litellm_acompletion_stream(
    litellm: ModuleType, edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key()
    stream = await litellm.acompletion(**call_args(edge, key), stream=True)
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])

    assert text.strip().endswith("You said: hi")
    assert_upstream_saw(upstream, "/v1/chat/completions")


@pytest.mark.usefixtures("sync_loop")
def test_litellm_authentication_error(
    litellm: ModuleType, edge: EdgeProcess, upstream: FakeUpstream, bad_key: str
) -> None:
    with pytest.raises(openai.APIError) as caught:
        litellm.completion(**call_args(edge, bad_key))

    assert type(caught.value) is litellm.AuthenticationError, caught.value
    assert status_code(caught.value) == 401
    assert_key_not_in(caught.value, bad_key)
    assert upstream.records == []


async def test_litellm_async_authentication_error(
    litellm: ModuleType, edge: EdgeProcess, upstream: FakeUpstream
) -> None:
    bad_key = keys.make_key("gw_sk_", keys.new_kid())
    with pytest.raises(openai.APIError) as caught:
        await litellm.acompletion(**call_args(edge, bad_key))

    assert type(caught.value) is litellm.AuthenticationError, caught.value
    assert status_code(caught.value) == 401
    assert_key_not_in(caught.value, bad_key)
    assert upstream.records == []


@pytest.mark.usefixtures("sync_loop")
def test_litellm_paused_key(
    litellm: ModuleType, edge: EdgeProcess, upstream: FakeUpstream, paused_key: str
) -> None:
    with pytest.raises(openai.APIError) as caught:
        litellm.completion(**call_args(edge, paused_key))

    # LiteLLM's `openai` mapping has no 403 case: PermissionDeniedError is never raised there.
    assert type(caught.value) is litellm.APIError, caught.value
    assert status_code(caught.value) == 403
    assert_key_not_in(caught.value, paused_key)
    assert upstream.records == []


@pytest.mark.usefixtures("sync_loop")
def test_litellm_rate_limit_error(
    litellm: ModuleType, edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key(rpm=1)
    litellm.completion(**call_args(edge, key))
    with pytest.raises(openai.APIError) as caught:
        litellm.completion(**call_args(edge, key))

    assert type(caught.value) is litellm.RateLimitError, caught.value
    assert status_code(caught.value) == 429
    assert_key_not_in(caught.value, key)
    assert_upstream_saw(upstream, "/v1/chat/completions")  # the refused request never left edge


def test_litellm_sdk_2_authentication_error(
    litellm: ModuleType, edge: EdgeProcess, bad_key: str
) -> None:
    resp = chat(edge, bad_key)
    assert resp.status_code == 401
    exc = mapped(401, resp.json(), sdk_2_text)

    assert type(exc) is litellm.AuthenticationError, exc
    assert status_code(exc) == 401
    assert_key_not_in(exc, bad_key)


def test_litellm_sdk_2_paused_and_rate_limited(
    litellm: ModuleType, edge: EdgeProcess, make_key: MakeKey, paused_key: str
) -> None:
    limited, _ = make_key(rpm=1)
    assert chat(edge, limited).status_code == 200
    for key, status, expected in [
        (paused_key, 403, litellm.APIError),
        (limited, 429, litellm.RateLimitError),
    ]:
        resp = chat(edge, key)
        assert resp.status_code == status
        exc = mapped(status, resp.json(), sdk_2_text)

        assert type(exc) is expected, exc
        assert status_code(exc) == status
        assert_key_not_in(exc, key)


@pytest.mark.parametrize("sdk_text", [sdk_2_text, sdk_3_text], ids=["sdk_2", "sdk_3"])
@pytest.mark.parametrize(
    ("error", "expected"),
    [
        pytest.param(errors.UpstreamUnreachable(), "BadGatewayError", id="502"),
        pytest.param(errors.ServiceUnavailable(), "ServiceUnavailableError", id="503"),
        pytest.param(errors.UpstreamTimeout(), "Timeout", id="504"),
    ],
)
def test_litellm_gateway_errors(
    litellm: ModuleType, error: errors.EdgeError, expected: str, sdk_text: SdkText
) -> None:
    """edge's own 5xx answers (bodies from edge.errors) keep the class their status implies."""
    exc = mapped(error.status, orjson.loads(error.body()), sdk_text)

    assert type(exc) is getattr(litellm, expected), exc
    assert status_code(exc) == error.status
