"""Draw the README's dashboard pictures from a real edge: `docs/dashboard.png` (today's overview
and the key table) and `docs/dashboard-usage.png` (one key's usage detail).

    .venv/bin/python -m scripts.dashboard_pictures

Starts its own redis-server, fake upstream and edge on free loopback ports (stopped on the
way out), creates a handful of keys, sends real requests, and fills 30 days of usage history
the way the scripts keep it (hashes per key and UTC day), so the pictures show what an
operator sees after a month. Needs chromium (`make test` installs it).
"""

from __future__ import annotations

import random
import secrets
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

from edge.keys import record_key, usage_day_key, usage_hour_key
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.edge_process import REPO, EdgeProcess, auth, edge_env
from tests.support.fake_upstream import FakeUpstream
from tests.support.redis_server import RedisServer

TOKEN = f"pictures-{secrets.token_hex(12)}"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
KEYS = [  # name, owner, plan, per-day requests around, metered
    ("acme prod", "acme", "team", 42_000, True),
    ("acme staging", "acme", "pro", 3_100, False),
    ("globex batch", "globex", "team", 18_500, True),
    ("initech chat", "initech", "pro", 7_400, False),
    ("hooli trial", "hooli", "free", 640, False),
]


def seed_history(client: object, kid: str, per_day: int, metered: bool, now: datetime) -> None:
    """30 days and 48 hours of usage, as admit.lua and settle.lua would have counted it (today
    up to this hour), and the record's running totals to match."""
    rng = random.Random(kid)
    pipe = client.pipeline(transaction=False)  # type: ignore[attr-defined]
    total = tokens = 0
    for back in range(30):
        day = (now - timedelta(days=back)).strftime("%Y-%m-%d")
        weekend = (now - timedelta(days=back)).weekday() >= 5
        share = (now.hour + 1) / 24 if back == 0 else 1.0
        requests = int(per_day * share * rng.uniform(0.7, 1.15) * (0.55 if weekend else 1))
        total += requests
        fields = {
            "requests": requests,
            "rate_limited": int(requests * rng.uniform(0, 0.04)),
            "rejected": int(requests * rng.uniform(0, 0.005)),
        }
        if metered:
            fields |= {"input_tokens": requests * 310, "output_tokens": requests * 95}
            tokens += requests * 405
        pipe.hset(usage_day_key(kid, day), mapping=fields)
    pipe.hset(record_key(kid), mapping={"requests": total, "tokens": tokens})
    for back in range(1, 48):
        hour = now - timedelta(hours=back)
        shape = 0.4 + 0.6 * max(0.0, 1 - abs(hour.hour - 14) / 10)
        requests = int(per_day / 24 * shape * rng.uniform(0.8, 1.2))
        fields = {"requests": requests, "rate_limited": int(requests * rng.uniform(0, 0.05))}
        if metered:
            fields |= {"input_tokens": requests * 310, "output_tokens": requests * 95}
        pipe.hset(usage_hour_key(kid, hour.strftime("%Y-%m-%dT%H")), mapping=fields)
    pipe.execute()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="edge-pictures-") as tmp:
        directory = Path(tmp)
        redis_server = RedisServer(directory / "redis").start()
        upstream = FakeUpstream().start()
        env = edge_env(
            redis_server.url,
            upstream.url,
            EDGE_ADMIN_TOKEN=TOKEN,
            EDGE_PRICING_MODELS='[{"match": "*", "input": 150, "output": 600}]',
        )
        edge = EdgeProcess(directory, env, "pictures").start()
        try:
            draw(edge, redis_server)
        finally:
            edge.stop()
            upstream.stop()
            redis_server.stop()


def draw(edge: EdgeProcess, redis_server: RedisServer) -> None:
    client = redis_server.client()
    now = datetime.fromtimestamp(int(client.time()[0]), UTC)
    made = []
    for name, owner, plan, per_day, metered in KEYS:
        fields = {"name": name, "owner": owner, "plan": plan}
        if metered:
            fields |= {"credits": 5_000_000, "tpm": 2_000_000}
        created = httpx.post(f"{edge.url}/admin/keys", headers=ADMIN, json=fields).json()
        seed_history(client, created["id"], per_day, metered, now)
        made.append(created)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    for created, (_, _, _, per_day, _) in zip(made, KEYS, strict=True):
        for _ in range(max(3, per_day // 2000)):
            httpx.post(f"{edge.url}/v1/chat/completions", headers=auth(created["key"]), json=body)
    rotated = made[0]["id"]
    httpx.post(
        f"{edge.url}/admin/keys/{rotated}/rotate", headers=ADMIN, json={"grace_seconds": 86400}
    )
    for _ in range(12):
        httpx.post(f"{edge.url}/v1/chat/completions", headers=auth(made[0]["key"]), json=body)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(base_url=edge.url, viewport={"width": 1440, "height": 900})
        page.goto("/admin/")
        page.get_by_label("Admin token").fill(TOKEN)
        page.get_by_role("button", name="Sign in").click()
        page.locator("#busiest-body tr").first.wait_for()
        page.locator("#keys-body tr").first.wait_for()
        page.screenshot(path=REPO / "docs" / "dashboard.png", full_page=True)
        page.set_viewport_size({"width": 1440, "height": 1500})  # the whole detail dialog
        page.locator(f'#keys-body tr[data-id="{rotated}"] button.link').click()
        bar = page.locator("#detail-charts svg.chart g.bar").nth(27)
        bar.wait_for()
        bar.focus()
        page.locator("#detail-dialog .detail").screenshot(
            path=REPO / "docs" / "dashboard-usage.png"
        )
        browser.close()
    print("wrote docs/dashboard.png and docs/dashboard-usage.png")


if __name__ == "__main__":
    main()
