"""edge/demo.py, the built-in demo upstream, on a real loopback socket: OpenAI-shaped answers,
and OpenAI-style 400 JSON (never a text/plain 500) for bodies it cannot use."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from edge.demo import NOTICE, start_demo_upstream


@pytest.fixture
async def demo() -> AsyncIterator[httpx.AsyncClient]:
    async with start_demo_upstream() as base, httpx.AsyncClient(base_url=base) as client:
        yield client


async def test_chat_plain_and_streaming(demo: httpx.AsyncClient) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    plain = await demo.post("/chat/completions", json=body)
    assert plain.status_code == 200
    assert plain.json()["choices"][0]["message"]["content"].startswith(NOTICE)
    assert plain.headers["x-edge-demo"] == "true"
    streamed = await demo.post("/chat/completions", json={**body, "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/chat/completions", {"messages": 5}, "messages"),
        ("/chat/completions", {"messages": []}, "messages"),
        ("/chat/completions", {"messages": [5]}, "messages.0"),
        ("/chat/completions", {"messages": [{"content": "x"}]}, "messages.0.role"),
        ("/chat/completions", {"model": 5, "messages": [{"role": "u"}]}, "model"),
        ("/chat/completions", {"messages": [{"role": "u"}], "stream": "yes"}, "stream"),
        ("/embeddings", {"input": 5}, "input"),
        ("/embeddings", {}, "input"),
        ("/completions", {"prompt": {"a": 1}}, "prompt"),
    ],
)
async def test_unusable_bodies_get_openai_400s(
    demo: httpx.AsyncClient, path: str, body: object, param: str
) -> None:
    resp = await demo.post(path, json=body)
    assert resp.status_code == 400, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


@pytest.mark.parametrize("content", [b"{", b"[1, 2]", b"\xff\xfe", b""])
async def test_non_json_bodies_get_400(demo: httpx.AsyncClient, content: bytes) -> None:
    resp = await demo.post("/chat/completions", content=content)
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_json"


async def test_unknown_paths_and_methods_are_json(demo: httpx.AsyncClient) -> None:
    for resp in (await demo.get("/nope"), await demo.delete("/models")):
        assert resp.status_code == 404
        assert resp.json()["error"]["code"] == "not_found"
