"""Where a client's key may be, request ids, and the errors clients act on, through real edge
processes, the session Redis and the session fake upstream.

- The key in `Authorization: Bearer`, a bare `Authorization`, `api-key` or `x-api-key`: each
  works with raw httpx and with the OpenAI SDK, and `api-key` through `openai.AzureOpenAI`;
  none of the three headers ever reaches the upstream (it gets the provider key).
- The same key in several headers is one key; two different keys are a 401 decided before
  any Redis command (MONITOR).
- `keys.headers = ["bearer"]`: the other headers are as if absent.
- Every error edge answers carries `x-request-id` (the client's when usable, else edge's own
  `req_` + 24 hex); the access log line has it as `request_id`; the client's id still reaches
  the upstream.
- 402 names the balance, 403 the route or the model refused, 429 the limit.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import AzureOpenAI, OpenAI
from openai.types.chat import ChatCompletionMessageParam

from edge.control.records import KeyRecord
from edge.keys import make_key as forge_key
from tests.support.edge_process import PROVIDER_KEY, EdgeProcess, auth, edge_env
from tests.support.fake_upstream import FakeUpstream, Record
from tests.support.monitor import CommandCounter
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

MakeKey = Callable[..., tuple[str, KeyRecord]]
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
CHAT = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
EDGE_ID = re.compile(r"^req_[0-9a-f]{24}$")
MAX_BODY = 65_536
CREDENTIAL_HEADERS = ("authorization", "api-key", "x-api-key")
TWO_KEYS = "Two different API keys were sent"
NO_KEY = "you didn't provide an API key"

FORMS: dict[str, Callable[[str], dict[str, str]]] = {
    "bearer": lambda key: {"Authorization": f"Bearer {key}"},
    "bare": lambda key: {"Authorization": key},
    "api-key": lambda key: {"api-key": key},
    "x-api-key": lambda key: {"x-api-key": key},
}


# Processes.


@pytest.fixture(scope="module")
def keyed(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    fake_upstream_server: FakeUpstream,
) -> Iterator[EdgeProcess]:
    """Every key header accepted (the default), the access log on, a 64 KiB body limit."""
    env = edge_env(
        redis_server.url,
        fake_upstream_server.url,
        EDGE_LOG_ACCESS="true",
        EDGE_SERVER_MAX_BODY_BYTES=str(MAX_BODY),
    )
    proc = EdgeProcess(tmp_path_factory.mktemp("keyed"), env, "keyed").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def bearer_only(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    fake_upstream_server: FakeUpstream,
) -> Iterator[EdgeProcess]:
    env = edge_env(redis_server.url, fake_upstream_server.url, EDGE_KEYS_HEADERS="bearer")
    proc = EdgeProcess(tmp_path_factory.mktemp("bearer"), env, "bearer").start()
    yield proc
    proc.stop()


# Helpers.


def assert_no_client_credentials(records: list[Record]) -> None:
    """The upstream got the provider key as Bearer, and none of the client's key headers."""
    assert records
    for record in records:
        assert record.headers("authorization") == [f"Bearer {PROVIDER_KEY}"], record.raw_headers
        assert record.headers("api-key") == [] and record.headers("x-api-key") == []


def error_of(resp: httpx.Response) -> dict[str, Any]:
    error = resp.json()["error"]
    assert isinstance(error, dict)
    return error


def assert_invalid_key(resp: httpx.Response, message_part: str | None = None) -> None:
    assert resp.status_code == 401, resp.text
    error = error_of(resp)
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
    if message_part is not None:
        assert message_part in error["message"], error["message"]


def access_lines(proc: EdgeProcess, path: str, count: int = 1) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def seen() -> bool:
        lines = [json.loads(x) for x in proc.log().splitlines() if x.startswith('{"time"')]
        found[:] = [line for line in lines if line.get("path") == path]
        return len(found) >= count

    assert wait_until(seen, 5), f"no access line for {path}: {proc.log()[-2000:]}"
    return found


def marker() -> str:
    return f"/v1/files/rid-{secrets.token_hex(6)}"


# 1. Each header form.


@pytest.mark.parametrize("form", list(FORMS))
def test_each_header_form_with_httpx(
    keyed: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey, form: str
) -> None:
    key, _ = make_key("pro")
    headers = {**FORMS[form](key), "Content-Type": "application/json"}
    with httpx.Client(base_url=keyed.url, headers=headers, timeout=10) as client:
        chat = client.post("/v1/chat/completions", content=CHAT)
        models = client.get("/v1/models")
    assert chat.status_code == 200, chat.text
    assert chat.json()["object"] == "chat.completion"
    assert models.status_code == 200 and models.json()["data"][0]["id"] == "edge-demo"
    assert [r.path for r in upstream.records] == ["/v1/chat/completions", "/v1/models"]
    assert_no_client_credentials(upstream.records)

    upstream.clear()  # a stranger's key in the same header: refused, nothing forwarded
    stranger = forge_key("gw_sk_", key[6:18])  # the right id, another secret
    resp = httpx.get(f"{keyed.url}/v1/models", headers=FORMS[form](stranger), timeout=10)
    assert_invalid_key(resp)
    assert upstream.records == []


def sdk_client(url: str, key: str, form: str) -> tuple[OpenAI, dict[str, Any]]:
    """An OpenAI SDK client that sends `key` in the header `form`, and the per-call headers
    that make it so (the SDK sends `Authorization: Bearer <api_key>` unless told otherwise)."""
    base = f"{url}/v1"
    if form == "bearer":
        return OpenAI(base_url=base, api_key=key, max_retries=0, timeout=10), {}
    if form == "bare":
        client = OpenAI(
            base_url=base,
            api_key=key,
            default_headers={"Authorization": key},
            max_retries=0,
            timeout=10,
        )
        return client, {}
    client = OpenAI(base_url=base, api_key="unused-placeholder", max_retries=0, timeout=10)
    return client, {form: key, "Authorization": openai.Omit()}


@pytest.mark.parametrize("form", list(FORMS))
def test_each_header_form_with_the_openai_sdk(
    keyed: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey, form: str
) -> None:
    key, _ = make_key("pro")
    client, extra = sdk_client(keyed.url, key, form)
    with client:
        completion = client.chat.completions.create(
            model="m", messages=MESSAGES, extra_headers=extra
        )
        with client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, extra_headers=extra
        ) as stream:
            text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
        models = client.models.list(extra_headers=extra)
    assert (completion.choices[0].message.content or "").endswith("You said: hi")
    assert text.strip().endswith("You said: hi")
    assert [m.id for m in models.data] == ["edge-demo"]
    paths = [r.path for r in upstream.records]
    assert paths == ["/v1/chat/completions", "/v1/chat/completions", "/v1/models"]
    assert_no_client_credentials(upstream.records)

    upstream.clear()
    wrong, wrong_extra = sdk_client(keyed.url, forge_key("gw_sk_", key[6:18]), form)
    with wrong, pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list(extra_headers=wrong_extra)
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    assert upstream.records == []


def test_the_api_key_header_through_azure_openai(
    keyed: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    """`AzureOpenAI(api_key=…)` sends only `api-key`. Pointed at `<edge>/v1` it calls
    `/v1/models?api-version=…` and `/v1/deployments/<model>/chat/completions?api-version=…`;
    edge forwards both as they are (the fake upstream streams on the second when asked to)."""
    key, _ = make_key("pro")
    with AzureOpenAI(
        base_url=f"{keyed.url}/v1",
        api_key=key,
        api_version="2024-06-01",
        max_retries=0,
        timeout=10,
    ) as client:
        models = client.models.list()
        with client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, extra_headers={"x-fake-chunks": "3"}
        ) as stream:
            deltas = [chunk.choices[0].delta.content for chunk in stream if chunk.choices]
    assert [m.id for m in models.data] == ["edge-demo"]
    assert deltas == ["tok0 ", "tok1 ", "tok2 "]
    assert [(r.path, r.query) for r in upstream.records] == [
        ("/v1/models", "api-version=2024-06-01"),
        ("/v1/deployments/m/chat/completions", "api-version=2024-06-01"),
    ]
    assert_no_client_credentials(upstream.records)

    upstream.clear()
    with (
        AzureOpenAI(
            base_url=f"{keyed.url}/v1",
            api_key=forge_key("gw_sk_", key[6:18]),
            api_version="2024-06-01",
            max_retries=0,
            timeout=10,
        ) as wrong,
        pytest.raises(openai.AuthenticationError) as caught,
    ):
        wrong.models.list()
    assert caught.value.status_code == 401
    assert upstream.records == []


# 2. One key, or two.


@pytest.mark.parametrize(
    "forms",
    [("bearer", "api-key", "x-api-key"), ("bare", "x-api-key"), ("bearer", "api-key")],
    ids="+".join,
)
def test_the_same_key_in_several_headers_is_one_key(
    keyed: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey, forms: tuple[str, ...]
) -> None:
    key, _ = make_key("pro")
    headers: dict[str, str] = {}
    for form in forms:
        headers.update(FORMS[form](key))
    resp = httpx.get(f"{keyed.url}/v1/models", headers=headers, timeout=10)
    assert resp.status_code == 200, resp.text
    assert_no_client_credentials(upstream.records)


def conflicting(a: str, b: str) -> list[list[tuple[str, str]]]:
    """Header lists carrying two different keys."""
    return [
        [("Authorization", f"Bearer {a}"), ("api-key", b)],
        [("Authorization", f"Bearer {a}"), ("x-api-key", b)],
        [("api-key", a), ("x-api-key", b)],
        [("Authorization", a), ("api-key", b)],
        [("api-key", a), ("api-key", b)],
        [("x-api-key", a), ("x-api-key", b)],
        [("Authorization", f"Bearer {a}"), ("Authorization", f"Bearer {b}")],
        [("Authorization", f"Bearer {a}"), ("api-key", a), ("x-api-key", b)],
    ]


def test_two_different_keys_are_refused_without_a_redis_command(
    keyed: EdgeProcess,
    upstream: FakeUpstream,
    make_key: MakeKey,
    redis_server: RedisServer,
) -> None:
    (a, _), (b, _) = make_key("pro"), make_key("pro")
    cases = conflicting(a, b)
    with httpx.Client(base_url=keyed.url, timeout=10) as client:
        assert client.get("/v1/models").status_code == 401  # warm the connection, no Redis
        time.sleep(0.3)  # what earlier tests left in flight (owner look-ups) is done
        with CommandCounter(redis_server.port) as counter:
            answers = [client.get("/v1/models", headers=headers) for headers in cases]
    assert counter.commands == []
    for headers, resp in zip(cases, answers, strict=True):
        assert_invalid_key(resp)
        assert error_of(resp)["message"].startswith(TWO_KEYS), (headers, resp.text)
        assert EDGE_ID.match(resp.headers["x-request-id"])
    assert upstream.records == []
    # each key alone is fine
    assert httpx.get(f"{keyed.url}/v1/models", headers=auth(a)).status_code == 200
    assert httpx.get(f"{keyed.url}/v1/models", headers={"api-key": b}).status_code == 200


def test_keys_headers_bearer_treats_the_other_headers_as_absent(
    bearer_only: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    (key, _), (other, _) = make_key("pro"), make_key("pro")
    url = f"{bearer_only.url}/v1/models"
    for form in ("api-key", "x-api-key"):
        assert_invalid_key(httpx.get(url, headers=FORMS[form](key), timeout=10), NO_KEY)
    assert_invalid_key(httpx.get(url, headers=FORMS["bare"](key), timeout=10))
    assert upstream.records == []

    assert httpx.get(url, headers=auth(key), timeout=10).status_code == 200
    # another key in an ignored header is no second key: no conflict
    both = {**auth(key), "api-key": other, "x-api-key": other}
    assert httpx.get(url, headers=both, timeout=10).status_code == 200
    assert len(upstream.records) == 2
    assert_no_client_credentials(upstream.records)


# 3. Request ids.


ErrorCase = Callable[[EdgeProcess, MakeKey], Callable[[dict[str, Any]], httpx.Response]]


def _missing(proc: EdgeProcess, make_key: MakeKey) -> Callable[..., httpx.Response]:
    return lambda h: httpx.get(f"{proc.url}/v1/models", headers=h, timeout=10)


def _stranger(proc: EdgeProcess, make_key: MakeKey) -> Callable[..., httpx.Response]:
    _, rec = make_key("pro")
    forged = forge_key("gw_sk_", rec.id)
    return lambda h: httpx.get(f"{proc.url}/v1/models", headers={**auth(forged), **h}, timeout=10)


def _two_keys(proc: EdgeProcess, make_key: MakeKey) -> Callable[..., httpx.Response]:
    (a, _), (b, _) = make_key("pro"), make_key("pro")
    return lambda h: httpx.get(
        f"{proc.url}/v1/models", headers={**auth(a), "x-api-key": b, **h}, timeout=10
    )


def _no_credits(proc: EdgeProcess, make_key: MakeKey) -> Callable[..., httpx.Response]:
    key, _ = make_key("pro", credits=0)
    return lambda h: httpx.get(f"{proc.url}/v1/models", headers={**auth(key), **h}, timeout=10)


def _out_of_scope(proc: EdgeProcess, make_key: MakeKey) -> Callable[..., httpx.Response]:
    key, _ = make_key("pro", scopes={"routes": ["embeddings"]})
    return lambda h: httpx.get(f"{proc.url}/v1/models", headers={**auth(key), **h}, timeout=10)


def _trace(proc: EdgeProcess, make_key: MakeKey) -> Callable[..., httpx.Response]:
    key, _ = make_key("pro")
    return lambda h: httpx.request(
        "TRACE", f"{proc.url}/v1/models", headers={**auth(key), **h}, timeout=10
    )


def _too_large(proc: EdgeProcess, make_key: MakeKey) -> Callable[..., httpx.Response]:
    key, _ = make_key("pro")
    body = b"x" * (MAX_BODY + 1)
    return lambda h: httpx.post(
        f"{proc.url}/v1/embeddings", headers={**auth(key), **h}, content=body, timeout=10
    )


def _limited(proc: EdgeProcess, make_key: MakeKey) -> Callable[..., httpx.Response]:
    key, _ = make_key("free", rpm=1)
    assert httpx.get(f"{proc.url}/v1/models", headers=auth(key), timeout=10).status_code == 200
    return lambda h: httpx.get(f"{proc.url}/v1/models", headers={**auth(key), **h}, timeout=10)


ERRORS: dict[str, tuple[int, ErrorCase]] = {
    "401-no-key": (401, _missing),
    "401-unknown-key": (401, _stranger),
    "401-two-keys": (401, _two_keys),
    "402": (402, _no_credits),
    "403": (403, _out_of_scope),
    "405": (405, _trace),
    "413": (413, _too_large),
    "429": (429, _limited),
}
USABLE_IDS = ["client-id-" + secrets.token_hex(4), "A" * 199 + "~", "x", "a:b/c?d=e&f#g"]
REPLACED_IDS: list[str | bytes] = ["a" * 201, "has space", b"caf\xe9", "tab\there"]


@pytest.mark.parametrize("case", list(ERRORS))
def test_every_error_carries_a_request_id(
    keyed: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey, case: str
) -> None:
    status, build = ERRORS[case]
    send = build(keyed, make_key)
    upstream.clear()
    for sent in USABLE_IDS:
        resp = send({"X-Request-Id": sent})
        assert resp.status_code == status, resp.text
        assert resp.headers.get_list("x-request-id") == [sent]
    own = []
    for replaced in [None, *REPLACED_IDS]:
        resp = send({} if replaced is None else {"X-Request-Id": replaced})
        assert resp.status_code == status, resp.text
        [rid] = resp.headers.get_list("x-request-id")
        assert EDGE_ID.match(rid), (replaced, rid)
        own.append(rid)
    assert len(set(own)) == len(own)  # each request its own
    assert upstream.records == []  # all of them edge's own answers


def test_request_ids_in_the_access_log_and_upstream(
    keyed: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key("pro")
    client_id = f"client-{secrets.token_hex(8)}"
    upstream_id = f"req_up{secrets.token_hex(8)}"

    # errors: the id sent to the client is the line's
    paths = [marker() for _ in range(3)]
    refused = [
        httpx.get(keyed.url + paths[0], headers={"X-Request-Id": client_id}),
        httpx.get(keyed.url + paths[1]),
        httpx.get(keyed.url + paths[2], headers={"X-Request-Id": "x" * 201}),
    ]
    assert [r.status_code for r in refused] == [401] * 3
    assert refused[0].headers["x-request-id"] == client_id
    for path, resp in zip(paths, refused, strict=True):
        [line] = access_lines(keyed, path)
        assert line["request_id"] == resp.headers["x-request-id"]
        assert line["status"] == 401
    assert EDGE_ID.match(access_lines(keyed, paths[1])[0]["request_id"])
    assert EDGE_ID.match(access_lines(keyed, paths[2])[0]["request_id"])

    # relayed answers: the client's id (or edge's own); the upstream's stays apart
    relayed_with, relayed_without = marker(), marker()
    knob = {"x-fake-header": f"x-request-id: {upstream_id}"}
    with_id = httpx.get(
        keyed.url + relayed_with, headers=auth(key, **knob, **{"X-Request-Id": client_id})
    )
    without = httpx.get(keyed.url + relayed_without, headers=auth(key, **knob))
    assert (with_id.status_code, without.status_code) == (200, 200)
    [line] = access_lines(keyed, relayed_with)
    assert (line["request_id"], line["upstream_request_id"]) == (client_id, upstream_id)
    [line] = access_lines(keyed, relayed_without)
    assert EDGE_ID.match(line["request_id"]), line
    assert line["upstream_request_id"] == upstream_id
    # the client's id still reaches the upstream, unchanged
    [first, second] = upstream.records
    assert first.headers("x-request-id") == [client_id]
    assert second.headers("x-request-id") in ([], [line["request_id"]])


# 4. Errors a client can act on.


def test_402_names_the_balance(keyed: EdgeProcess, make_key: MakeKey) -> None:
    key, _ = make_key("pro", credits=0)
    resp = httpx.get(f"{keyed.url}/v1/models", headers=auth(key), timeout=10)
    assert resp.status_code == 402
    error = error_of(resp)
    assert (error["type"], error["code"]) == ("insufficient_balance", "insufficient_balance")
    assert error["message"] == (
        "You exceeded your current quota: this API key's balance is 0 credits. Ask for a "
        "top-up to continue."
    )


def test_403_names_the_route_or_the_model(
    keyed: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    routed, _ = make_key("pro", scopes={"routes": ["embeddings"]})
    resp = httpx.post(f"{keyed.url}/v1/chat/completions", headers=auth(routed), content=CHAT)
    assert resp.status_code == 403
    error = error_of(resp)
    assert (error["type"], error["code"]) == ("permission_error", "insufficient_permissions")
    assert error["message"].startswith("This API key may not use the route `chat/completions`")

    modeled, _ = make_key("pro", scopes={"models": ["gpt-4o-mini"]})
    body = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
    resp = httpx.post(f"{keyed.url}/v1/chat/completions", headers=auth(modeled), content=body)
    assert resp.status_code == 403
    error = error_of(resp)
    assert (error["type"], error["code"]) == ("permission_error", "insufficient_permissions")
    assert error["message"].startswith("This API key may not use the model `gpt-4o`")
    assert upstream.records == []


def test_429_names_the_limit_and_the_wait(keyed: EdgeProcess, make_key: MakeKey) -> None:
    key, _ = make_key("free", rpm=1)
    with httpx.Client(base_url=keyed.url, headers=auth(key), timeout=10) as client:
        assert client.get("/v1/models").status_code == 200
        resp = client.get("/v1/models")
    assert resp.status_code == 429
    message = error_of(resp)["message"]
    assert message.startswith(
        "Rate limit reached for this API key on requests per min (RPM): Limit 1, Requested 1. "
        "Please try again in "
    ), message
    assert int(resp.headers["retry-after"]) >= 1


def test_401_without_a_key_says_so(keyed: EdgeProcess) -> None:
    resp = httpx.get(f"{keyed.url}/v1/models", timeout=10)
    assert_invalid_key(resp, NO_KEY)
    assert EDGE_ID.match(resp.headers["x-request-id"])
