"""The official OpenAI Python SDK works unchanged against edge.

The test plan (docs/testplan.md) has no id for this file; it exercises T18 (streaming relay) and T26
(key swap) through a real client. The SDK, pointed at `{edge.url}/v1` with a gw_sk_ key, gets chat
completions (plain and streamed), the model list and embeddings, sync and async; edge's 429 and 401
surface as `openai.RateLimitError` and `openai.AuthenticationError`; the upstream sees the provider
key and the path the SDK chose."""

from __future__ import annotations

from collections.abc import Callable

import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from openai.types.chat import ChatCompletionMessageParam

from edge import keys
from edge.control.records import KeyRecord
from tests.support.edge_process import PROVIDER_KEY, EdgeProcess
from tests.support.fake_upstream import FakeUpstream

MakeKey = Callable[..., tuple[str, KeyRecord]]

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def sdk(edge: EdgeProcess, key: str) -> OpenAI:
    return OpenAI(base_url=f"{edge.url}/v1", api_key=key, max_retries=0, timeout=10)


def assert_upstream_saw(upstream: FakeUpstream, *paths: str) -> None:
    assert [r.path for r in upstream.records] == list(paths)
    for record in upstream.records:
        assert record.headers("authorization") == [f"Bearer {PROVIDER_KEY}"]


def test_sdk_chat_completion(edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey) -> None:
    key, _ = make_key()
    with sdk(edge, key) as client:
        completion = client.chat.completions.create(model="m", messages=MESSAGES)

    assert completion.object == "chat.completion"
    assert completion.choices[0].finish_reason == "stop"
    assert (completion.choices[0].message.content or "").endswith("You said: hi")
    assert_upstream_saw(upstream, "/v1/chat/completions")


def test_sdk_chat_completion_stream(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key()
    deltas: list[str] = []
    finish_reasons: list[str | None] = []
    with (
        sdk(edge, key) as client,
        client.chat.completions.create(model="m", messages=MESSAGES, stream=True) as stream,
    ):
        for chunk in stream:  # ends when the SDK reads `data: [DONE]`
            assert chunk.object == "chat.completion.chunk"
            deltas.append(chunk.choices[0].delta.content or "")
            finish_reasons.append(chunk.choices[0].finish_reason)

    assert len(deltas) > 2
    assert "".join(deltas).strip().endswith("You said: hi")
    assert finish_reasons[-1] == "stop"
    assert_upstream_saw(upstream, "/v1/chat/completions")
    assert upstream.records[0].completed


async def test_async_sdk_models_embeddings_and_stream(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key()
    async with AsyncOpenAI(
        base_url=f"{edge.url}/v1", api_key=key, max_retries=0, timeout=10
    ) as client:
        models = await client.models.list()
        embedding = await client.embeddings.create(model="e", input=["a", "b"])
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        async with stream:
            text = "".join([c.choices[0].delta.content or "" async for c in stream])

    assert [m.id for m in models.data] == ["edge-demo"]
    assert [e.index for e in embedding.data] == [0, 1]
    assert all(len(e.embedding) == 8 for e in embedding.data)
    assert text.strip().endswith("You said: hi")
    assert_upstream_saw(upstream, "/v1/models", "/v1/embeddings", "/v1/chat/completions")


def test_sdk_models_and_embeddings(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key()
    with sdk(edge, key) as client:
        models = client.models.list()
        embedding = client.embeddings.create(model="e", input="hello")

    assert [m.id for m in models.data] == ["edge-demo"]
    assert embedding.data[0].object == "embedding"
    assert len(embedding.data[0].embedding) == 8
    assert_upstream_saw(upstream, "/v1/models", "/v1/embeddings")


def test_sdk_rate_limit_error(edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey) -> None:
    key, _ = make_key(rpm=1)
    with sdk(edge, key) as client:
        client.models.list()
        with pytest.raises(openai.RateLimitError) as caught:
            client.models.list()

    assert caught.value.status_code == 429
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.type == "rate_limit_error"
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert_upstream_saw(upstream, "/v1/models")  # the refused request never left edge


@pytest.mark.parametrize(
    "bad_key",
    [
        pytest.param("gw_sk_not-a-real-key", id="malformed"),
        pytest.param(keys.make_key("gw_sk_", keys.new_kid()), id="well-formed-unknown"),
    ],
)
async def test_async_sdk_authentication_error(
    edge: EdgeProcess, upstream: FakeUpstream, bad_key: str
) -> None:
    async with AsyncOpenAI(
        base_url=f"{edge.url}/v1", api_key=bad_key, max_retries=0, timeout=10
    ) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(model="m", messages=MESSAGES)

    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert caught.value.type == "invalid_request_error"
    assert upstream.records == []
