from __future__ import annotations

import httpx


def test_chat_completion_through_edge(edge, upstream, make_key) -> None:
    key, _ = make_key()
    resp = httpx.post(
        f"{edge.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["object"] == "chat.completion"
    assert len(upstream.records) == 1
