"""The `edge` command line (docs/keys.md), run as a user runs it: `python -m edge …` in a
subprocess against the session redis-server.

Covers `keys create|list|show|pause|resume|revoke|rotate|set-limits` and `plans`, their `--json`
output, one-line errors without tracebacks (exit 1: the operation failed, exit 2: usage or
configuration), and, through the session `edge` process, that each change takes effect on the
very next request (the end-to-end side of T29's instant revocation, docs/testplan.md).
"""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

import httpx
import pytest
import redis

from edge import keys
from edge.keys import record_key
from tests.support.edge_process import EdgeProcess, run_cli
from tests.support.fake_upstream import FakeUpstream
from tests.support.keys import secret_part
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer

FMT = keys.KeyFormat("gw_sk_")


def ok_json(redis: RedisServer, *args: str) -> Any:
    done = run_cli(*args, "--json", redis_url=redis.url)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return json.loads(done.stdout)


def assert_clean_failure(done: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    """Exit `code`, one `edge: …` line on stderr mentioning `text`, no traceback."""
    command = "edge " + " ".join(done.args[3:])
    assert "Traceback" not in done.stderr + done.stdout, f"{command} printed a traceback"
    assert done.returncode == code, (command, done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge: "), (command, done.stderr)
    assert text in lines[0], (command, done.stderr)


def owner() -> str:
    return f"owner-{uuid.uuid4().hex[:10]}"


def test_keys_create_list_show(redis_server: RedisServer) -> None:
    me, other = owner(), owner()
    created = ok_json(
        redis_server,
        *("keys", "create", "--plan", "pro", "--name", "n", "--owner", me),
        *("--rpm", "7", "--rpd", "70"),
    )
    assert FMT.parse(created["key"].encode()) is not None
    assert created["key"].startswith("gw_sk_" + created["id"])
    expected = {"plan": "pro", "name": "n", "owner": me, "rpm": 7, "rpd": 70, "status": "active"}
    assert {k: created[k] for k in expected} == expected
    kid = created["id"]
    other_kid = ok_json(redis_server, "keys", "create", "--plan", "free", "--owner", other)["id"]

    listed = ok_json(redis_server, "keys", "list")
    assert {kid, other_kid} <= {row["id"] for row in listed}
    assert all("key" not in row for row in listed)
    mine = ok_json(redis_server, "keys", "list", "--owner", me)
    assert [row["id"] for row in mine] == [kid]
    assert {k: mine[0][k] for k in expected} == expected

    shown = run_cli("keys", "show", kid, redis_url=redis_server.url)
    assert shown.returncode == 0, shown.stderr
    fields = {}
    for line in shown.stdout.splitlines():
        name, _, value = line.partition(" ")
        fields[name] = value.strip()
    assert fields["id"] == kid
    assert fields["plan"] == "pro"
    assert fields["owner"] == me
    assert fields["status"] == "active"
    assert fields["rpm"] == "7" and fields["rpd"] == "70"
    assert created["key"] not in shown.stdout


def test_keys_pause_resume_revoke(redis_server: RedisServer) -> None:
    kid = ok_json(redis_server, "keys", "create", "--plan", "free")["id"]
    assert ok_json(redis_server, "keys", "pause", kid)["status"] == "paused"
    assert ok_json(redis_server, "keys", "resume", kid)["status"] == "active"
    assert ok_json(redis_server, "keys", "revoke", kid)["status"] == "revoked"

    again = run_cli("keys", "resume", kid, "--json", redis_url=redis_server.url)
    assert_clean_failure(again, 1, "revoked")
    assert again.stdout == ""
    assert ok_json(redis_server, "keys", "show", kid)["status"] == "revoked"


def test_keys_rotate_keeps_the_id(redis_server: RedisServer) -> None:
    created = ok_json(redis_server, "keys", "create", "--plan", "free")
    rotated = ok_json(redis_server, "keys", "rotate", created["id"], "--grace", "0")
    assert rotated["id"] == created["id"]
    assert rotated["key"] != created["key"]
    assert FMT.parse(rotated["key"].encode()) is not None
    assert rotated["key"].startswith("gw_sk_" + created["id"])
    assert rotated["rotated"] is not None
    assert rotated["previous_key_valid_until"] is None


def test_keys_set_limits_and_back_to_plan(redis_server: RedisServer) -> None:
    kid = ok_json(redis_server, "keys", "create", "--plan", "pro")["id"]
    limited = ok_json(redis_server, "keys", "set-limits", kid, "--rpm", "3")
    assert (limited["rpm"], limited["rpm_override"], limited["rpd"]) == (3, 3, 50_000)
    cleared = ok_json(redis_server, "keys", "set-limits", kid, "--rpm", "plan")
    assert (cleared["rpm"], cleared["rpm_override"]) == (200, None)


def test_plans_json(redis_server: RedisServer) -> None:
    assert ok_json(redis_server, "plans") == [
        {"plan": "free", "rpm": 20, "rpd": 1_000, "tpm": None, "tpd": None, "shadow": False},
        {"plan": "pro", "rpm": 200, "rpd": 50_000, "tpm": None, "tpd": None, "shadow": False},
        {"plan": "team", "rpm": 1_000, "rpd": 250_000, "tpm": None, "tpd": None, "shadow": False},
    ]


def test_unknown_plan_fails_cleanly(redis_server: RedisServer) -> None:
    done = run_cli("keys", "create", "--plan", "gold", "--json", redis_url=redis_server.url)
    assert_clean_failure(done, 2, "unknown plan 'gold'")
    assert done.stdout == ""


def test_keys_need_a_redis_url() -> None:
    done = run_cli("keys", "create", "--plan", "free", "--json", redis_url=None)
    assert_clean_failure(done, 2, "EDGE_REDIS_URL")


def test_bad_config_value_fails_cleanly(redis_server: RedisServer) -> None:
    for args in (("plans",), ("keys", "list", "--json")):
        done = run_cli(*args, redis_url=redis_server.url, EDGE_SERVER_PORT="abc")
        assert_clean_failure(done, 2, "configuration error")
        assert "EDGE_SERVER_PORT" in done.stderr or "server.port" in done.stderr


@pytest.mark.parametrize(
    ("args", "env", "text"),
    [
        (("serve", "--port", "70000"), {}, "server.port (--port)"),
        (("serve", "--port", "0"), {}, "server.port (--port)"),
        (("serve", "--port", "8x"), {}, "--port: invalid int value"),
        (("serve",), {"EDGE_REDIS_URL": "redis://127.0.0.1:99999/0"}, "redis.url"),
        (("serve",), {"EDGE_REDIS_URL": "rediss://h/0?ssl_ca_certs=/nope"}, "redis.url"),
        (("serve",), {"EDGE_SERVER_KEEPALIVE_TIMEOUT": "0.2"}, "server.keepalive_timeout"),
        (("serve", "--nope"), {}, "unrecognized arguments: --nope"),
        (("keys", "list"), {"EDGE_REDIS_URL": "redis://h:x/0"}, "redis.url"),
        (("keys", "create", "--plan", "free", "--expires-in", "1e17"), {}, "--expires-in"),
        (("keys", "frobnicate"), {}, "invalid choice"),
    ],
)
def test_bad_input_is_one_line_never_a_traceback(
    redis_server: RedisServer, args: tuple[str, ...], env: dict[str, str], text: str
) -> None:
    """Every bad value: exit 2, one `edge: …` line naming the setting or flag."""
    done = run_cli(*args, redis_url=redis_server.url, **env)
    assert_clean_failure(done, 2, text)


@pytest.mark.parametrize(
    "args",
    [
        ("keys", "create", "--plan", "free", "--expires-in", str(10**17)),
        ("keys", "create", "--plan", "free", "--expires-in", "0"),
        ("keys", "create", "--plan", "free", "--rpm", str(10**13)),
    ],
)
def test_out_of_range_values_are_refused(redis_server: RedisServer, args: tuple[str, ...]) -> None:
    done = run_cli(*args, redis_url=redis_server.url)
    assert_clean_failure(done, 2, "Input should be")
    assert done.stdout == ""


def test_rotation_grace_is_bounded(redis_server: RedisServer) -> None:
    kid = ok_json(redis_server, "keys", "create", "--plan", "free")["id"]
    done = run_cli("keys", "rotate", kid, "--grace", str(10**15), redis_url=redis_server.url)
    assert_clean_failure(done, 2, "grace_seconds: Input should be")
    year = 365 * 86_400
    rotated = ok_json(redis_server, "keys", "rotate", kid, "--grace", str(50 * year))
    assert rotated["previous_key_valid_until"] > rotated["rotated"] + 49 * year


def test_show_reads_expiry_as_the_proxy_does(
    edge: EdgeProcess, redis_server: RedisServer, r: redis.Redis
) -> None:
    """A hand-edited expiry the proxy treats as expired shows as expired (0), never as none;
    one past year 9999 prints as a number instead of crashing the table."""
    created = ok_json(redis_server, "keys", "create", "--plan", "free")
    kid, key = created["id"], created["key"]
    r.hset(record_key(kid), "expires", "1e17")
    assert ok_json(redis_server, "keys", "show", kid)["expires"] == 0
    resp = httpx.get(f"{edge.url}/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 401 and "expired" in resp.json()["error"]["message"]
    r.hset(record_key(kid), "expires", str(10**12 - 1))
    shown = run_cli("keys", "show", kid, redis_url=redis_server.url)
    assert shown.returncode == 0, shown.stderr
    assert str(10**12 - 1) in shown.stdout


def test_unreachable_redis_fails_cleanly() -> None:
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    for args in (
        ("keys", "create", "--plan", "free"),
        ("keys", "list"),
        ("keys", "show", "abcdefabcdef"),
        ("keys", "pause", "abcdefabcdef"),
    ):
        done = run_cli(*args, "--json", redis_url=nobody)
        assert_clean_failure(done, 1, "Redis unavailable")


def test_cli_changes_apply_on_the_next_request(
    edge: EdgeProcess, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    created = ok_json(redis_server, "keys", "create", "--plan", "free")
    kid = created["id"]
    rotating = ok_json(redis_server, "keys", "create", "--plan", "free")

    with httpx.Client(base_url=edge.url, timeout=10) as client:

        def call(key: str) -> httpx.Response:
            return client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})

        def error_code(resp: httpx.Response) -> str:
            return str(resp.json()["error"]["code"])

        assert call(created["key"]).status_code == 200

        ok_json(redis_server, "keys", "pause", kid)
        paused = call(created["key"])
        assert paused.status_code == 403
        assert paused.json()["error"]["type"] == "permission_error"
        assert error_code(paused) == "insufficient_permissions"

        ok_json(redis_server, "keys", "resume", kid)
        assert call(created["key"]).status_code == 200

        ok_json(redis_server, "keys", "revoke", kid)
        revoked = call(created["key"])
        assert revoked.status_code == 401
        assert error_code(revoked) == "invalid_api_key"

        assert call(rotating["key"]).status_code == 200
        rotated = ok_json(redis_server, "keys", "rotate", rotating["id"], "--grace", "0")
        old = call(rotating["key"])
        assert old.status_code == 401
        assert error_code(old) == "invalid_api_key"
        assert call(rotated["key"]).status_code == 200

    assert len(upstream.records) == 4, "only the admitted requests reach the upstream"


def test_cli_parity_scopes_credits_update_and_audit(
    edge: EdgeProcess, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    """The CLI reaches every operation the admin API has, through the same store functions:
    scopes, credits, expiry at a time, updates, top-ups, and the audit log (actor `cli`)."""
    me = owner()
    created = ok_json(
        redis_server,
        *("keys", "create", "--plan", "free", "--owner", me, "--credits", "2"),
        *("--scope-route", "models", "--scope-model", "gpt-4o*"),
        *("--expires-at", "2999-01-01T00:00:00Z"),
    )
    kid, key = created["id"], created["key"]
    assert created["credits"] == 2
    assert created["scopes"] == {"routes": ["models"], "models": ["gpt-4o*"]}
    assert created["expires"] == 32472144000
    with httpx.Client(base_url=edge.url, headers={"Authorization": f"Bearer {key}"}) as client:
        assert client.get("/v1/models").status_code == 200
        assert client.post("/v1/embeddings", json={"model": "gpt-4o"}).status_code == 403

        updated = ok_json(
            redis_server,
            "keys",
            "update",
            kid,
            "--name",
            "renamed",
            "--credits",
            "unlimited",
            "--no-scopes",
            "--expires-at",
            "never",
        )
        assert (updated["name"], updated["credits"], updated["scopes"]) == ("renamed", None, None)
        assert updated["expires"] is None
        assert client.post("/v1/embeddings", json={"input": "x"}).status_code == 200

        failed = run_cli("keys", "credits", kid, "--add", "5", redis_url=redis_server.url)
        assert_clean_failure(failed, 1, "unlimited credits")
        assert ok_json(redis_server, "keys", "update", kid, "--credits", "1")["credits"] == 1
        assert ok_json(redis_server, "keys", "credits", kid, "--add", "-5")["credits"] == 0
        assert client.get("/v1/models").status_code == 402
        assert ok_json(redis_server, "keys", "credits", kid, "--add", "1")["credits"] == 1
        assert client.get("/v1/models").status_code == 200

    entries = ok_json(redis_server, "audit", "--limit", "20")
    mine = [e for e in entries if e["key"] == kid]
    assert [e["action"] for e in mine] == ["credits", "credits", "update", "update", "create"]
    assert {e["actor"] for e in mine} == {"cli"}
    assert mine[-1]["changes"]["scopes"] == {"routes": ["models"], "models": ["gpt-4o*"]}
    text = json.dumps(entries)
    assert key not in text and secret_part(key) not in text
    table = run_cli("audit", "--limit", "5", redis_url=redis_server.url)
    assert table.returncode == 0 and table.stdout.splitlines()[0].startswith("TIME")


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (("keys", "create", "--plan", "free", "--scope-route", "a b"), "scopes.routes.0"),
        (("keys", "create", "--plan", "free", "--scope-model", "gpt 4"), "scopes.models.0"),
        (("keys", "create", "--plan", "free", "--credits", "-1"), "credits"),
        (("keys", "create", "--plan", "free", "--expires-at", "2030-01-01"), "time zone"),
        (
            ("keys", "create", "--plan", "free", "--expires-in", "5", "--expires-at", "9"),
            "not both",
        ),
        (("keys", "update", "abcdefabcdef"), "nothing to change"),
        (("keys", "update", "abcdefabcdef", "--plan", "gold"), "unknown plan"),
        (("audit", "--limit", "0"), "--limit"),
    ],
)
def test_cli_values_are_validated_like_the_api(
    redis_server: RedisServer, args: tuple[str, ...], text: str
) -> None:
    assert_clean_failure(run_cli(*args, redis_url=redis_server.url), 2, text)


def test_owner_cap_from_the_cli(redis_server: RedisServer) -> None:
    me = owner()
    env = {"EDGE_KEYS_MAX_PER_OWNER": "2"}
    ids = []
    for _ in range(2):
        done = run_cli(
            "keys",
            "create",
            "--plan",
            "free",
            "--owner",
            me,
            "--json",
            redis_url=redis_server.url,
            **env,
        )
        assert done.returncode == 0, done.stderr
        ids.append(json.loads(done.stdout)["id"])
    third = run_cli(
        "keys", "create", "--plan", "free", "--owner", me, redis_url=redis_server.url, **env
    )
    assert_clean_failure(third, 1, "keys.max_per_owner")
    assert run_cli("keys", "revoke", ids[0], redis_url=redis_server.url).returncode == 0
    again = run_cli(
        "keys", "create", "--plan", "free", "--owner", me, redis_url=redis_server.url, **env
    )
    assert again.returncode == 0, again.stderr
    listed = ok_json(redis_server, "keys", "list", "--owner", me, "--status", "revoked")
    assert [row["id"] for row in listed] == [ids[0]]
