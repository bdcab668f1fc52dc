"""/metrics through a real edge process: the names, labels and values docs/metrics.md lists."""

from __future__ import annotations

import time

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from edge.keys import record_key
from edge.metrics.registry import OUTCOMES
from tests.support.edge_process import EdgeProcess
from tests.support.fake_upstream import FakeUpstream
from tests.support.metrics import inflight_settles, scrape, value
from tests.support.raw_http import close, open_request, request_head


def test_contract_metrics(edge: EdgeProcess, upstream: FakeUpstream, make_key) -> None:
    key, rec = make_key("pro")
    before = scrape(edge.url)
    with httpx.Client(base_url=edge.url) as client:
        for _ in range(3):
            assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).is_success
        resp = client.get(
            "/v1/models", headers={"Authorization": f"Bearer {key}", "x-fake-status": "404"}
        )
        assert resp.status_code == 404
        assert client.get("/v1/models").status_code == 401
        text = client.get("/metrics").text
    after = scrape(edge.url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("edge_requests_total", plan="pro", outcome="allowed") == 4
    assert delta("edge_requests_total", plan="none", outcome="unauthorized") == 1
    assert delta("edge_upstream_responses_total", plan="pro", upstream="default", status="2xx") == 3
    assert delta("edge_upstream_responses_total", plan="pro", upstream="default", status="4xx") == 1
    assert delta("edge_admission_seconds_count") == 4
    assert delta("edge_upstream_ttfb_seconds_count", plan="pro") == 4
    assert value(after, "edge_inflight_requests") == 0
    for plan, rpm, rpd in (("free", 20, 1000), ("pro", 200, 50000), ("team", 1000, 250000)):
        assert value(after, "edge_plan_limit", plan=plan, window="minute") == rpm
        assert value(after, "edge_plan_limit", plan=plan, window="day") == rpd
    for kind in ("timeout", "connection", "noscript", "other"):
        assert ("edge_redis_errors_total", (("kind", kind),)) in after

    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert types["edge_requests"] == "counter"
    assert types["edge_plan_limit"] == "gauge"
    assert types["edge_admission_seconds"] == "histogram"
    assert types["edge_upstream_ttfb_seconds"] == "histogram"
    assert types["edge_upstream_responses"] == "counter"
    assert types["edge_inflight_requests"] == "gauge"
    assert types["edge_redis_errors"] == "counter"
    # no per-key labels: the kid never appears in /metrics
    assert rec.id not in text and key not in text


def test_control_plane_errors_are_json(edge: EdgeProcess) -> None:
    with httpx.Client(base_url=edge.url) as client:
        for method, path, status in (
            ("GET", "/nope", 404),
            ("GET", "/v1", 404),
            ("GET", "/admin/keys", 404),
            ("POST", "/healthz", 405),
            ("DELETE", "/metrics", 405),
        ):
            resp = client.request(method, path)
            assert resp.status_code == status, (method, path)
            assert resp.headers["content-type"] == "application/json"
            assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"status": "ready"}


def test_every_request_gets_exactly_one_outcome(
    edge: EdgeProcess, upstream: FakeUpstream, make_key
) -> None:
    """A client that leaves before sending its body was admitted and charged: it is counted
    (as allowed), once; and the upstream never hears of it."""
    key, _ = make_key("team")
    before = scrape(edge.url)
    head = request_head(edge.port, key, "POST /v1/chat/completions HTTP/1.1", "Content-Length: 100")
    sock = open_request(edge.port, head + b'{"model":')
    time.sleep(0.1)
    close(sock, rst=True)
    assert inflight_settles(edge.url)
    after = scrape(edge.url)
    counted = {
        outcome: value(after, "edge_requests_total", plan="team", outcome=outcome)
        - value(before, "edge_requests_total", plan="team", outcome=outcome)
        for outcome in OUTCOMES
    }
    assert counted == {outcome: (1 if outcome == "allowed" else 0) for outcome in OUTCOMES}
    assert upstream.records == []


def test_a_missing_plan_is_logged_once_a_second_not_per_request(
    edge: EdgeProcess, r: redis.Redis, make_key
) -> None:
    key, rec = make_key()
    r.hset(record_key(rec.id), "plan", "platinum")
    start = len(edge.log())
    with httpx.Client(base_url=edge.url, headers={"Authorization": f"Bearer {key}"}) as client:
        for _ in range(20):
            resp = client.get("/v1/models")
            assert resp.status_code == 503
            assert resp.json()["error"]["code"] == "config_error"
    lines = [line for line in edge.log()[start:].splitlines() if "not configured" in line]
    assert 1 <= len(lines) <= 2, lines
    counted = value(
        scrape(edge.url), "edge_requests_total", plan="unconfigured", outcome="unavailable"
    )
    assert counted >= 20
