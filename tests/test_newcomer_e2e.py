"""`make run` as a newcomer meets it: `edge serve` with no EDGE_REDIS_URL, no EDGE_UPSTREAM_URL
and no admin token makes an admin token for this run and prints it in the banner next to the
dashboard's URL; the admin API and the dashboard work with it. Never when Redis or the upstream
is a real one (their data outlive the run), never when the operator set EDGE_ADMIN_TOKEN (then
the URL alone is printed). And the demo upstream, through edge, reports `usage` the way OpenAI
does: in a plain answer, and as the last chunk of a stream that asked for it.

One edge per configuration, started together for the module (tests/support/fleet.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from edge.keys import KID_LEN
from tests.support.edge_process import EdgeProcess, auth, edge_env
from tests.support.fake_upstream import FakeUpstream
from tests.support.fleet import Fleet, clean_proxy_env
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

CONFIGURED_TOKEN = "operator-chosen-admin-token-0123456789"
TOKEN_LINE = re.compile(
    r"^\s*Dashboard: (?P<url>\S+)\s+admin token \(this run only\): (?P<token>\S+)\s*$", re.M
)
DASHBOARD_LINE = re.compile(r"^\s*Dashboard: (?P<url>\S+)\s*$", re.M)
DEMO_KEY_LINE = re.compile(r"Demo key \(plan \w+, shown once\): (gw_sk_\w+)")
CHAT = {"model": "edge-demo", "messages": [{"role": "user", "content": "Hello"}]}


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    fake_upstream_server: FakeUpstream,
) -> Iterator[Fleet]:
    envs = {
        "demo": edge_env("", ""),  # what `make run` does: embedded Redis, demo upstream
        "operator-token": edge_env("", "", EDGE_ADMIN_TOKEN=CONFIGURED_TOKEN),
        "real-redis": edge_env(redis_server.url, ""),
        "real-upstream": edge_env("", fake_upstream_server.url),
    }
    with clean_proxy_env():
        fleet = Fleet(tmp_path_factory.mktemp("newcomer")).start(envs)
        yield fleet
        fleet.stop()


def client(proc: EdgeProcess) -> httpx.Client:
    return httpx.Client(base_url=proc.url, timeout=10, trust_env=False)


def banner_token(proc: EdgeProcess) -> tuple[str, str]:
    """(dashboard URL, admin token) from the banner's token line."""
    found = TOKEN_LINE.findall(proc.log())
    assert len(found) == 1, f"want one dashboard line with a token:\n{proc.log()}"
    url, token = found[0]
    return url, token


def demo_key(proc: EdgeProcess) -> str:
    found = DEMO_KEY_LINE.findall(proc.log())
    assert found, f"no demo key in the banner:\n{proc.log()}"
    return str(found[0])


def test_demo_run_prints_an_admin_token_that_opens_the_admin_api(fleet: Fleet) -> None:
    """The banner's token (32+ URL-safe characters, printed once) lists the keys, the demo key
    among them, creates a key that then works on /v1; a wrong token is a 401."""
    proc = fleet["demo"]
    url, token = banner_token(proc)
    assert url == f"{proc.url}/admin/"
    assert re.fullmatch(r"[A-Za-z0-9_-]{32,}", token), token
    assert proc.log().count(token) == 1, "the token is printed once, in the banner only"
    kid = demo_key(proc)[len("gw_sk_") :][:KID_LEN]
    with client(proc) as c:
        listed = c.get("/admin/keys", headers=auth(token))
        assert listed.status_code == 200, listed.text
        assert kid in [record["id"] for record in listed.json()["data"]]
        for wrong in ({}, auth(token[:-1] + ("A" if token[-1] != "A" else "B"))):
            refused = c.get("/admin/keys", headers=wrong)
            assert refused.status_code == 401, refused.text
        created = c.post("/admin/keys", headers=auth(token), json={"plan": "free"})
        assert created.status_code == 201, created.text
        models = c.get("/v1/models", headers=auth(created.json()["key"]))
        assert models.status_code == 200, models.text


def test_demo_run_serves_the_dashboard(fleet: Fleet) -> None:
    """The URL the banner prints is the dashboard page, and every file it loads is there."""
    proc = fleet["demo"]
    url, _ = banner_token(proc)
    with client(proc) as c:
        page = c.get(url)
        assert page.status_code == 200, page.text
        assert page.headers["content-type"].startswith("text/html")
        assert "<title>edge" in page.text
        assets = re.findall(r'(?:src|href)="(ui/[^"]+)"', page.text)
        assert any(a.endswith(".js") for a in assets), assets
        for asset in assets:
            resp = c.get(url + asset)
            assert resp.status_code == 200, (asset, resp.status_code)


@pytest.mark.parametrize("name", ["real-redis", "real-upstream"])
def test_no_token_is_made_with_a_real_redis_or_upstream(fleet: Fleet, name: str) -> None:
    """A token printed to a console would outlive the run on a real Redis, or guard a real
    provider account: none is made, none printed, and /admin stays closed."""
    proc = fleet[name]
    log = proc.log()
    assert "edge is listening on" in log  # the banner was printed
    assert "this run only" not in log, log
    assert TOKEN_LINE.search(log) is None, log
    with client(proc) as c:
        assert c.get("/admin/keys").status_code in (401, 404)


def test_a_configured_admin_token_is_never_printed(fleet: Fleet) -> None:
    """EDGE_ADMIN_TOKEN set: the banner shows the dashboard's URL, never the token, and the
    operator's token (not a generated one) opens the admin API."""
    proc = fleet["operator-token"]
    log = proc.log()
    assert CONFIGURED_TOKEN not in log
    assert "this run only" not in log, log
    assert [m.group("url") for m in DASHBOARD_LINE.finditer(log)] == [f"{proc.url}/admin/"], log
    with client(proc) as c:
        listed = c.get("/admin/keys", headers=auth(CONFIGURED_TOKEN))
        assert listed.status_code == 200, listed.text


def sse_events(body: str) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON decoded, `[DONE]` as the string."""
    events: list[Any] = []
    for line in body.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_usage(usage: Any) -> None:
    assert isinstance(usage, dict), usage
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    assert isinstance(prompt, int) and prompt > 0, usage
    assert isinstance(completion, int) and completion > 0, usage
    assert usage.get("total_tokens") == prompt + completion, usage


def test_demo_upstream_reports_usage_through_edge(fleet: Fleet) -> None:
    """The banner's demo key: a chat completion carries `usage`; a stream with
    stream_options.include_usage ends with a usage chunk (no choices) before `[DONE]`, and the
    chunks before it carry none."""
    proc = fleet["demo"]
    key = demo_key(proc)
    with client(proc) as c:
        plain = c.post("/v1/chat/completions", headers=auth(key), json=CHAT)
        assert plain.status_code == 200, plain.text
        assert_usage(plain.json().get("usage"))

        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        with c.stream("POST", "/v1/chat/completions", headers=auth(key), json=body) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["content-type"].startswith("text/event-stream")
            text = streamed.read().decode()
    events = sse_events(text)
    assert events[-1] == "[DONE]", text
    *chunks, last = events[:-1]
    assert chunks, text
    assert last["choices"] == [], last
    assert_usage(last.get("usage"))
    assert all(chunk.get("usage") is None for chunk in chunks), text
    text_parts = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]]
    assert "".join(text_parts), "the stream carried no text before its usage chunk"
