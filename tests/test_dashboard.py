"""The operator dashboard (`/admin/`) in a real browser: Debian's chromium driven by Playwright,
against a real edge process and redis-server.

Sign in (wrong, then right), create and copy a key once, reload without it, pause / resume /
rotate / revoke taking effect on `/v1` at once, limits edited, errors shown next to the form, a
hostile key name rendered as text, paging through a thousand keys, sign out; with the CSP and
other headers present and no console errors beyond the 401 the wrong-token step asks for.
Screenshots of the main views go to the test's tmp dir.
"""

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

from edge.control.specs import NewKey
from edge.keys import record_key
from tests.support.browser import Watched
from tests.support.edge_process import EdgeProcess, auth, edge_env
from tests.support.fake_upstream import FakeUpstream
from tests.support.keys import store_call
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.browser

TOKEN = f"dash-{secrets.token_hex(16)}"
KEY = re.compile(r"gw_sk_[0-9A-Za-z]{50}")
CAP = 3


@pytest.fixture(scope="module")
def edge_admin(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    fake_upstream_server: FakeUpstream,
) -> Iterator[EdgeProcess]:
    env = edge_env(
        redis_server.url,
        fake_upstream_server.url,
        EDGE_ADMIN_TOKEN=TOKEN,
        EDGE_KEYS_MAX_PER_OWNER=str(CAP),
    )
    proc = EdgeProcess(tmp_path_factory.mktemp("dashboard"), env, "dashboard").start()
    yield proc
    proc.stop()


@pytest.fixture
def watched(browser: Browser, edge_admin: EdgeProcess) -> Iterator[Watched]:
    context = browser.new_context(base_url=edge_admin.url)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=edge_admin.url)
    page = context.new_page()
    page.set_default_timeout(5000)
    yield Watched(page)
    context.close()


def sign_in(page: Page, token: str = TOKEN) -> None:
    page.goto("/admin/")
    page.get_by_label("Admin token").fill(token)
    page.get_by_role("button", name="Sign in").click()


def signed_in(page: Page, owner: str | None = None) -> None:
    sign_in(page)
    expect(page.get_by_role("table").first).to_be_visible()
    if owner:
        page.get_by_label("Filter by owner").fill(owner)
        page.get_by_role("button", name="Apply").click()


def row(page: Page, kid: str) -> Any:
    return page.locator(f'#keys-body tr[data-id="{kid}"]')


def api_key(edge: EdgeProcess, **fields: Any) -> dict[str, Any]:
    resp = httpx.post(f"{edge.url}/admin/keys", headers=auth(TOKEN), json=fields, timeout=10)
    assert resp.status_code == 201, resp.text
    return resp.json()  # type: ignore[no-any-return]


def api_record(edge: EdgeProcess, kid: str) -> dict[str, Any]:
    resp = httpx.get(f"{edge.url}/admin/keys/{kid}", headers=auth(TOKEN), timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def v1(edge: EdgeProcess, key: str) -> int:
    return httpx.get(f"{edge.url}/v1/models", headers=auth(key), timeout=10).status_code


def owner() -> str:
    return f"dash-{uuid.uuid4().hex[:10]}"


def test_sign_in_wrong_then_right_and_out(
    watched: Watched, edge_admin: EdgeProcess, tmp_path: Path
) -> None:
    page = watched.page
    response = page.goto("/admin/")
    assert response is not None
    headers = response.headers
    assert "default-src 'self'" in headers["content-security-policy"]
    assert "'unsafe-inline'" not in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    assert headers["cache-control"] == "no-store"

    page.get_by_label("Admin token").fill("not-the-token-at-all")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not valid")
    page.screenshot(path=tmp_path / "sign-in-error.png")

    sign_in(page)
    expect(page.get_by_role("heading", name="Keys", exact=True)).to_be_visible()
    plans = page.locator("#plans-body tr")
    expect(plans).to_have_count(3)
    expect(plans.first).to_contain_text("free")
    assert page.evaluate("sessionStorage.getItem('edge.adminToken')") == TOKEN
    assert page.context.cookies() == []
    assert TOKEN not in page.url
    page.screenshot(path=tmp_path / "keys.png", full_page=True)

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("Admin token")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('edge.adminToken')") is None
    assert watched.errors(allow_401=True) == []
    assert TOKEN not in edge_admin.log()


def test_create_shows_the_key_once_and_copies_it(
    watched: Watched, edge_admin: EdgeProcess, tmp_path: Path
) -> None:
    page, me = watched.page, owner()
    signed_in(page, me)
    page.get_by_role("button", name="New key").click()
    form = page.get_by_role("dialog")
    form.get_by_label("Name").fill("browser key")
    form.get_by_label("Owner").fill(me)
    form.get_by_label("Plan").select_option("pro")
    form.get_by_label("Requests per minute").fill("7")
    form.get_by_label("Credits").fill("50")
    form.get_by_role("button", name="Create").click()

    field = page.get_by_role("dialog").get_by_label("New key")
    expect(field).to_have_value(KEY)
    key = field.input_value()
    expect(page.get_by_text("will not be shown again")).to_be_visible()
    page.screenshot(path=tmp_path / "new-key.png")
    page.get_by_role("button", name="Copy").click()
    expect(page.get_by_role("status")).to_have_text("Copied.")
    assert page.evaluate("navigator.clipboard.readText()") == key
    page.get_by_role("button", name="Close").click()
    expect(page.get_by_role("dialog")).to_have_count(0)

    assert page.evaluate("document.getElementById('new-key-value').value") == ""
    assert key not in page.content()
    kid = key[6:18]
    expect(row(page, kid)).to_contain_text("browser key")
    expect(row(page, kid)).to_contain_text("50")
    assert v1(edge_admin, key) == 200

    page.reload()
    expect(row(page, kid)).to_be_visible()
    assert key not in page.content()
    assert watched.errors() == []


def test_row_actions_take_effect_on_v1_at_once(
    watched: Watched, edge_admin: EdgeProcess, tmp_path: Path
) -> None:
    page, me = watched.page, owner()
    created = api_key(edge_admin, plan="free", name="acted on", owner=me)
    kid, key = created["id"], created["key"]
    signed_in(page, me)
    line = row(page, kid)

    line.get_by_role("button", name="Pause").click()
    expect(line).to_contain_text("paused")
    assert v1(edge_admin, key) == 403
    line.get_by_role("button", name="Resume").click()
    expect(line).to_contain_text("active")
    assert v1(edge_admin, key) == 200

    line.get_by_role("button", name="Rotate").click()
    expect(page.get_by_role("dialog").get_by_label("Grace period (seconds)")).to_have_value("0")
    page.get_by_role("dialog").get_by_role("button", name="Confirm").click()
    field = page.get_by_role("dialog").get_by_label("New key")
    expect(field).to_have_value(KEY)
    new_key = field.input_value()
    assert new_key != key
    page.get_by_role("button", name="Close").click()
    assert new_key not in page.content()
    assert v1(edge_admin, new_key) == 200
    assert v1(edge_admin, key) == 401  # grace 0: the old key died at once

    line.get_by_role("button", name="Edit").click()
    page.get_by_role("dialog").get_by_label("LLM tokens per minute").fill("7000")
    page.get_by_role("dialog").get_by_role("button", name="Save").click()
    expect(line).to_contain_text("7,000 (key)")
    assert api_record(edge_admin, kid)["tpm_override"] == 7000
    line.get_by_role("button", name="Edit").click()
    expect(page.get_by_role("dialog").get_by_label("LLM tokens per minute")).to_have_value("7000")
    page.get_by_role("dialog").get_by_label("LLM tokens per minute").fill("")
    page.get_by_role("dialog").get_by_label("Requests per minute").fill("1")
    page.get_by_role("dialog").get_by_role("button", name="Save").click()
    expect(line).to_contain_text("1 (key)")
    assert api_record(edge_admin, kid)["tpm_override"] is None
    assert [v1(edge_admin, new_key) for _ in range(2)] == [200, 429]

    line.get_by_role("button", name="Revoke").click()
    page.screenshot(path=tmp_path / "revoke.png")
    page.get_by_role("dialog").get_by_role("button", name="Confirm").click()
    expect(line).to_have_class("revoked")
    expect(line.locator(".row-actions button")).to_have_count(0)
    assert v1(edge_admin, new_key) == 401
    assert watched.errors() == []


def test_api_errors_are_shown_next_to_the_form(watched: Watched, edge_admin: EdgeProcess) -> None:
    page, me = watched.page, owner()
    for _ in range(CAP):
        api_key(edge_admin, plan="free", owner=me)
    signed_in(page, me)
    page.get_by_role("button", name="New key").click()
    form = page.get_by_role("dialog")
    form.get_by_label("Owner").fill(me)
    form.get_by_role("button", name="Create").click()
    alert = form.get_by_role("alert")
    expect(alert).to_contain_text("max_per_owner")

    form.get_by_label("Owner").fill(owner())
    form.get_by_label("Credits").fill(str(10**13))
    form.get_by_role("button", name="Create").click()
    expect(alert).to_contain_text("credits")
    expect(page.locator("#key-dialog")).not_to_be_visible()
    # the API's 409 and 422 answers are expected here; nothing else may have failed
    assert all("status of 409" in m or "status of 422" in m for m in watched.errors())


def test_values_from_redis_are_text_never_html(
    watched: Watched, edge_admin: EdgeProcess, r: Any
) -> None:
    page, me = watched.page, owner()
    hostile = "<img src=x onerror=alert(1)>"
    created = api_key(edge_admin, plan="free", name=hostile, owner=me)
    r.hset(record_key(created["id"]), "plan", "<script>alert(2)</script>")
    signed_in(page, me)
    line = row(page, created["id"])
    expect(line).to_contain_text(hostile)
    expect(line).to_contain_text("<script>alert(2)</script>")
    assert page.locator("#keys-body img, #keys-body script").count() == 0
    page.wait_for_timeout(200)  # give an injected handler the chance to fire
    assert watched.dialogs == []
    assert watched.errors() == []


def test_a_thousand_keys_page_through_the_cursor(
    watched: Watched, edge_admin: EdgeProcess, redis_server: RedisServer
) -> None:
    me = owner()

    async def many(store: Any) -> None:
        store.owners.cap = 2000
        for i in range(1000):
            await store.create(NewKey(plan="free", owner=me, name=f"bulk {i}"), "test")

    store_call(redis_server.url, many)
    page = watched.page
    signed_in(page, me)
    rows = page.locator("#keys-body tr")
    expect(rows).to_have_count(100)
    expect(rows.first).to_contain_text("bulk 999")  # newest first
    for shown in (200, 300):
        page.get_by_role("button", name="Load more").click()
        expect(rows).to_have_count(shown)
    page.get_by_label("Filter by status").select_option("revoked")
    page.get_by_role("button", name="Apply").click()
    expect(page.get_by_text("No keys match.")).to_be_visible()
    assert watched.errors() == []
