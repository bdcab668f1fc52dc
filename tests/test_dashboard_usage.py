"""The dashboard's usage views in a real browser (Debian's chromium under Playwright), against a
real edge process and redis-server: a key's detail charts the numbers that were sent (7
admitted and 3 rate-limited requests in today's bar), the hour view, the previous secret's
counter after a rotation, the last audit entries, today's overview and busiest keys; numbers
for people (50,000); no console errors, the CSP intact, every bar readable without colour."""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from edge.keys import usage_day_key
from tests.support.browser import Watched
from tests.support.edge_process import EdgeProcess, auth, edge_env
from tests.support.fake_upstream import FakeUpstream
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.browser

TOKEN = f"usage-{secrets.token_hex(16)}"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def edge_admin(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    fake_upstream_server: FakeUpstream,
) -> Iterator[EdgeProcess]:
    env = edge_env(redis_server.url, fake_upstream_server.url, EDGE_ADMIN_TOKEN=TOKEN)
    proc = EdgeProcess(tmp_path_factory.mktemp("dash-usage"), env, "dash-usage").start()
    yield proc
    proc.stop()


@pytest.fixture
def watched(browser: Browser, edge_admin: EdgeProcess) -> Iterator[Watched]:
    context = browser.new_context(base_url=edge_admin.url, viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(5000)
    yield Watched(page)
    context.close()


def sign_in(page: Page) -> None:
    response = page.goto("/admin/")
    assert response is not None
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "'unsafe-inline'" not in csp
    page.get_by_label("Admin token").fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Keys", exact=True)).to_be_visible()


def new_key(edge: EdgeProcess, **fields: Any) -> dict[str, Any]:
    resp = httpx.post(f"{edge.url}/admin/keys", headers=ADMIN, json=fields, timeout=10)
    assert resp.status_code == 201, resp.text
    return resp.json()  # type: ignore[no-any-return]


def calls(edge: EdgeProcess, key: str, count: int) -> list[int]:
    return [
        httpx.get(f"{edge.url}/v1/models", headers=auth(key), timeout=10).status_code
        for _ in range(count)
    ]


def today(edge: EdgeProcess) -> str:
    """Today by Redis time, as the usage history counts it."""
    return str(httpx.get(f"{edge.url}/admin/usage/top", headers=ADMIN, timeout=10).json()["date"])


def open_detail(page: Page, kid: str) -> None:
    page.get_by_label("Filter by owner").fill("")
    page.get_by_role("button", name="Apply").click()
    page.locator(f'#keys-body tr[data-id="{kid}"]').get_by_role(
        "button", name=f"Usage of key {kid}"
    ).click()
    expect(page.get_by_role("dialog")).to_be_visible()


def test_a_key_s_chart_shows_the_requests_that_were_sent(
    watched: Watched, edge_admin: EdgeProcess, tmp_path: Path
) -> None:
    created = new_key(edge_admin, plan="free", rpm=7, name="charted", owner="chart-owner")
    assert calls(edge_admin, created["key"], 10) == [200] * 7 + [429] * 3
    page = watched.page
    sign_in(page)
    open_detail(page, created["id"])
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_role("heading", name=f"Key {created['id']} · charted")).to_be_visible()
    bar = dialog.locator('svg.chart g.bar[aria-label*="7 admitted"]')  # today's (Redis time)
    expect(bar).to_have_count(1)
    day = (bar.get_attribute("data-start") or "")[:10]
    expect(bar).to_have_attribute("aria-label", f"{day}: 7 admitted, 3 rate-limited, 0 rejected")
    # the numbers on focus, in words (and a pattern per series: readable without colour)
    bar.focus()
    expect(dialog.locator(".chart-caption")).to_have_text(
        f"{day}: 7 admitted, 3 rate-limited, 0 rejected"
    )
    assert bar.locator("rect.seg-requests").count() == 1
    assert bar.locator("rect.seg-rate_limited").count() == 1
    fills = {
        bar.locator(f"rect.seg-{name}").get_attribute("fill")
        for name in ("requests", "rate_limited")
    }
    assert all(fill and fill.startswith("url(#") for fill in fills) and len(fills) == 2
    expect(dialog.locator("svg.chart g.bar")).to_have_count(30)
    expect(dialog.locator(".legend").first).to_contain_text("rate-limited")
    expect(dialog.locator(".totals")).to_contain_text("7 admitted, 3 rate-limited")
    page.screenshot(path=tmp_path / "detail.png", full_page=True)

    # the hour view: this hour's bar has them all
    dialog.get_by_role("button", name="48 hours").click()
    expect(dialog.get_by_role("button", name="48 hours")).to_have_attribute("aria-pressed", "true")
    bars = dialog.locator("svg.chart g.bar")
    expect(bars).to_have_count(48)
    labels = [bars.nth(i).get_attribute("aria-label") or "" for i in range(48)]
    busy = [label for label in labels if "7 admitted" in label]
    assert len(busy) == 1 and busy[0].endswith("7 admitted, 3 rate-limited, 0 rejected"), labels
    assert watched.errors() == []


def test_the_previous_secret_and_the_audit_trail_are_on_the_key(
    watched: Watched, edge_admin: EdgeProcess
) -> None:
    created = new_key(edge_admin, plan="pro", owner=f"rot-{uuid.uuid4().hex[:6]}")
    rotated = httpx.post(
        f"{edge_admin.url}/admin/keys/{created['id']}/rotate",
        headers=ADMIN,
        json={"grace_seconds": 600},
        timeout=10,
    ).json()
    assert calls(edge_admin, created["key"], 4) == [200] * 4  # the old secret, in its grace
    assert calls(edge_admin, rotated["key"], 2) == [200] * 2
    page = watched.page
    sign_in(page)
    open_detail(page, created["id"])
    previous = page.locator("#detail-previous")
    expect(previous).to_be_visible()
    expect(previous).to_contain_text("4 requests since the rotation")
    expect(previous).to_contain_text("last used")
    audit = page.locator("#audit-body tr")
    expect(audit).to_have_count(2)  # create, then rotate: newest first
    expect(audit.first).to_contain_text("rotate")
    expect(audit.nth(1)).to_contain_text("create")
    assert watched.errors() == []


def test_the_overview_shows_today_and_the_busiest_keys(
    watched: Watched, edge_admin: EdgeProcess, r: Any, tmp_path: Path
) -> None:
    busy = new_key(edge_admin, plan="team", name="busiest", owner="overview")
    quiet = new_key(edge_admin, plan="team", name="quiet", owner="overview")  # counted in all
    day = today(edge_admin)
    # five million requests today, without sending them: the counter the scripts keep (more
    # than any other test's key has, in a Redis the whole suite shares)
    r.hincrby(usage_day_key(busy["id"], day), "requests", 5_000_000)
    assert calls(edge_admin, quiet["key"], 2) == [200, 200]
    page = watched.page
    sign_in(page)
    stats = page.locator("#overview-stats")
    expect(stats).to_contain_text("Requests today")
    first = page.locator("#busiest-body tr").first
    expect(first).to_contain_text("busiest")
    expect(first).to_contain_text("5,000,000")  # numbers for people
    total = httpx.get(
        f"{edge_admin.url}/admin/usage", headers=ADMIN, params={"from": day, "to": day}, timeout=10
    ).json()["totals"]["requests"]
    expect(stats).to_contain_text(f"{total:,}")
    assert re.search(r"\d[\d,]* of \d[\d,]*", stats.inner_text())
    page.screenshot(path=tmp_path / "overview.png", full_page=True)
    first.get_by_role("button").click()
    expect(page.get_by_role("dialog")).to_contain_text(busy["id"])
    assert watched.errors() == []
