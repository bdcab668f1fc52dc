"""Regression tests for defects of the control plane and the shared Redis, through real edge
processes, real redis-servers and the `edge` command line.

1. A model-scope glob can never make the shared Redis busy: a pathological glob against a long
   model answers a prompt 403 while Redis keeps answering PING within 50 ms; a model past 256
   characters is a 400 `model_too_long` before any matching.
2. A credit top-up past the balance cap (10^12 - 1) is a 409 that changes nothing, from the
   admin API and the CLI alike; a top-up landing exactly on the cap still admits.
3. Admin `limit` query parameters that are not plain small numbers (a superscript digit, a
   23-digit number) are 422 `invalid_value` naming `limit`, never a 500 with a traceback.
4. `edge serve --workers 2` survives SIGHUP with its workers (still its children, still
   serving) and still stops cleanly on SIGTERM; workers of a SIGKILLed supervisor exit by
   themselves within seconds.
5. Under fail-open, a revoke, pause or rotation made through this instance's admin API holds
   while Redis is down; an unchanged warmed key is still admitted.
6. C1 controls, bidirectional controls and line/paragraph separators are refused in a key's
   name and owner (admin API create and patch, CLI); ordinary Unicode is still accepted.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from edge.control.records import KeyRecord
from edge.keys import record_key
from tests.support.edge_process import EdgeProcess, auth, edge_env, run_cli
from tests.support.fake_upstream import FakeUpstream
from tests.support.keys import new_key
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

TOKEN = f"security-{secrets.token_hex(16)}"
CAP = 10**12 - 1  # the largest balance (and limit) edge stores
Spawn = Callable[..., EdgeProcess]
MakeKey = Callable[..., tuple[str, KeyRecord]]
BAD_TEXT_CHARS = [
    *("\u0080", "\u0085", "\u009b", "\u009f"),  # C1 controls (U+009B: CSI)
    *("\u202a", "\u202b", "\u202c", "\u202d", "\u202e"),  # bidi embeddings and overrides
    *("\u2066", "\u2067", "\u2068", "\u2069"),  # bidi isolates
    *("\u200e", "\u200f", "\u061c"),  # bidi marks
    *("\u2028", "\u2029"),  # line and paragraph separators
]
GOOD_TEXT = ["Café Müller", "東京チーム", "👩\u200d💻 dev", "❤️ 🇫🇷"]


@pytest.fixture(scope="module")
def admin_edge(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    fake_upstream_server: FakeUpstream,
) -> Iterator[EdgeProcess]:
    """One edge process with the admin API on, on the session Redis."""
    env = edge_env(redis_server.url, fake_upstream_server.url, EDGE_ADMIN_TOKEN=TOKEN)
    proc = EdgeProcess(tmp_path_factory.mktemp("security"), env, "security-admin").start()
    yield proc
    proc.stop()


def admin(proc: EdgeProcess) -> httpx.Client:
    return httpx.Client(base_url=f"{proc.url}/admin", headers=auth(TOKEN), timeout=10)


def owner() -> str:
    return f"sec-{uuid.uuid4().hex[:12]}"


def answer(resp: httpx.Response, status: int) -> Any:
    """The JSON body of an answer that must have `status` and be JSON."""
    assert resp.status_code == status, (resp.request.method, resp.request.url, resp.text)
    assert resp.headers["content-type"] == "application/json", resp.headers
    return resp.json()


def error(resp: httpx.Response, status: int, code: str, param: str | None = None) -> None:
    """OpenAI's error shape: this status, type `invalid_request_error`, this code (and param)."""
    err = answer(resp, status)["error"]
    assert (err["type"], err["code"]) == ("invalid_request_error", code), err
    if param is not None:
        assert err["param"] == param, err


def cli_refused(done: subprocess.CompletedProcess[str], *words: str) -> None:
    """A non-zero exit, one `edge: …` line on stderr holding one of `words`, no traceback."""
    command = "edge " + " ".join(done.args[3:])
    assert "Traceback" not in done.stdout + done.stderr, (command, done.stderr)
    assert done.returncode != 0, (command, done.stdout)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge: "), (command, done.stderr)
    assert any(w in lines[0].lower() for w in words), (command, done.stderr)


# 1. a model-scope glob cannot stall the shared Redis


class PingProbe(threading.Thread):
    """PINGs a Redis every few ms from its own connection, keeping the slowest round trip."""

    def __init__(self, server: RedisServer, limit: float = 20.0) -> None:
        super().__init__(daemon=True)
        self.client = server.client()
        self.limit = limit  # seconds: the probe never outlives this
        self.done = threading.Event()
        self.count = 0
        self.worst = 0.0

    def run(self) -> None:
        deadline = time.monotonic() + self.limit
        try:
            while not self.done.is_set() and time.monotonic() < deadline:
                start = time.perf_counter()
                try:
                    self.client.ping()
                except redis.RedisError:  # BUSY or a timeout: as bad as it gets
                    self.worst = float("inf")
                self.worst = max(self.worst, time.perf_counter() - start)
                self.count += 1
                time.sleep(0.005)
        finally:
            self.client.close()

    def stop(self) -> None:
        self.done.set()
        self.join(10)


def chat(proc: EdgeProcess, key: str, model: str) -> tuple[httpx.Response, float]:
    """POST a body with `model`; the answer and how long it took."""
    start = time.perf_counter()
    resp = httpx.post(
        f"{proc.url}/v1/responses", headers=auth(key), json={"model": model}, timeout=30
    )
    return resp, time.perf_counter() - start


def test_a_model_glob_never_stalls_redis(
    spawn_edge: Spawn, redis_factory: Callable[..., RedisServer], upstream: FakeUpstream
) -> None:
    """Scope `*-*-*-*x` against a model of 250 `-` (exponential for Lua patterns): a prompt
    403 while a PING from another client never waits 50 ms; a matching 250-character model is
    admitted; a 257-character model is a 400 `model_too_long` naming `model`."""
    server = redis_factory()
    proc = spawn_edge(edge_env(server.url, upstream.url), name="glob")
    key, rec = new_key(server.url, "pro")
    client = server.client()
    client.hset(record_key(rec.id), "scopes", json.dumps({"models": ["*-*-*-*x"]}))
    client.close()

    probe = PingProbe(server)
    probe.start()
    try:
        assert wait_until(lambda: probe.count >= 5, 5)
        answers = [chat(proc, key, "-" * 250) for _ in range(2)]
        time.sleep(0.05)
    finally:
        probe.stop()
    assert probe.worst < 0.05, f"a PING waited {probe.worst * 1000:.0f} ms ({probe.count} sent)"
    for resp, took in answers:
        assert resp.status_code == 403, resp.text
        assert resp.json()["error"]["code"] == "insufficient_permissions"
        assert took < 0.5, f"the 403 took {took:.2f} s"
    assert upstream.records == []

    matching, _ = chat(proc, key, "-" * 249 + "x")
    assert matching.status_code == 200, matching.text
    too_long, _ = chat(proc, key, "-" * 256 + "x")  # 257 characters; the glob would match it
    error(too_long, 400, "model_too_long", "model")
    assert len(upstream.records) == 1


# 2. a top-up past the cap


def test_a_top_up_past_the_balance_cap_is_refused(
    admin_edge: EdgeProcess, redis_server: RedisServer
) -> None:
    """From 999,999,999,998: +2 (and +CAP) is a 409 `conflict` leaving the balance as it was;
    +1 lands on the cap and the key is still admitted (200, not 402); the CLI refuses +2 with a
    non-zero exit and one `edge: …` line, the balance unchanged again."""
    with admin(admin_edge) as client:
        created = answer(client.post("/keys", json={"plan": "pro", "credits": CAP - 1}), 201)
        kid, key = created["id"], created["key"]
        for delta in (2, CAP):
            resp = client.post(f"/keys/{kid}/credits", json={"delta": delta})
            error(resp, 409, "conflict")
            assert answer(client.get(f"/keys/{kid}"), 200)["credits"] == CAP - 1

        topped = answer(client.post(f"/keys/{kid}/credits", json={"delta": 1}), 200)
        assert topped["credits"] == CAP
        resp = httpx.get(f"{admin_edge.url}/v1/models", headers=auth(key), timeout=10)
        assert resp.status_code == 200, resp.text
        assert answer(client.get(f"/keys/{kid}"), 200)["credits"] == CAP - 1

        done = run_cli("keys", "credits", kid, "--add", "2", "--json", redis_url=redis_server.url)
        cli_refused(done, "credit", "balance", str(CAP))
        assert done.stdout == ""
        assert answer(client.get(f"/keys/{kid}"), 200)["credits"] == CAP - 1


# 3. admin `limit` parameters


def test_admin_limit_parameters_are_422_never_500(admin_edge: EdgeProcess) -> None:
    """`?limit=²` and `?limit=99999999999999999999999` on /admin/keys and /admin/audit: 422
    `invalid_value` naming `limit`; no traceback in the log."""
    logged = len(admin_edge.log())
    with admin(admin_edge) as client:
        for path in ("/keys", "/audit"):
            for limit in ("\u00b2", "9" * 23):
                resp = client.get(path, params={"limit": limit})
                error(resp, 422, "invalid_value", "limit")
        answer(client.get("/keys", params={"limit": "1"}), 200)
    assert "Traceback" not in admin_edge.log()[logged:]


# 4. SIGHUP, SIGTERM and SIGKILL of a supervisor


def workers_of(pid: int) -> list[int]:
    """The worker processes (spawned interpreters) whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and is_worker(int(entry.name)):
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == pid:
                    found.append(int(entry.name))
    return sorted(found)


def is_worker(pid: int) -> bool:
    """`pid` is a live spawned edge worker (a zombie has no command line)."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def metrics_dir_of(worker: int) -> Path:
    environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    values = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
    return Path(values["PROMETHEUS_MULTIPROC_DIR"])


def fresh_get(url: str, key: str) -> int:
    """One request on a new connection, so the kernel may hand it to either worker."""
    with httpx.Client(timeout=10) as client:
        return client.get(
            f"{url}/v1/models", headers={**auth(key), "Connection": "close"}
        ).status_code


class Started:
    """Every worker and metrics directory a test saw, to clean up whatever happens."""

    def __init__(self) -> None:
        self.workers: set[int] = set()
        self.dirs: set[Path] = set()

    def supervisor(self, spawn_edge: Spawn, env: dict[str, str], name: str) -> EdgeProcess:
        proc = spawn_edge(env, name=name, args=("--workers", "2"))
        assert wait_until(lambda: len(workers_of(proc.pid)) == 2, 15)
        self.see(proc.pid)
        return proc

    def see(self, pid: int) -> list[int]:
        workers = workers_of(pid)
        self.workers.update(workers)
        for worker in workers:
            with contextlib.suppress(OSError, KeyError):
                self.dirs.add(metrics_dir_of(worker))
        return workers

    def cleanup(self) -> None:
        for pid in self.workers:
            if is_worker(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        tmp = Path(tempfile.gettempdir())
        for directory in self.dirs:
            if directory.parent == tmp and directory.name.startswith("edge-metrics-"):
                shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.multiproc
def test_sighup_reloads_and_workers_never_outlive_the_supervisor(
    spawn_edge: Spawn, redis_server: RedisServer, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    """After SIGHUP the supervisor lives, two workers are its children and serve; SIGTERM
    then exits 0 with no worker and no metrics directory left. A SIGKILLed supervisor's
    workers exit by themselves within ~5 s."""
    started = Started()
    env = edge_env(redis_server.url, upstream.url)
    key, _ = make_key("team")
    try:
        proc = started.supervisor(spawn_edge, env, "hup")
        [metrics_dir] = started.dirs
        assert proc.proc is not None
        os.kill(proc.pid, signal.SIGHUP)
        time.sleep(1.0)
        assert proc.proc.poll() is None, f"SIGHUP ended the supervisor ({proc.proc.returncode})"
        assert wait_until(lambda: len(started.see(proc.pid)) == 2, 15), workers_of(proc.pid)
        assert [fresh_get(proc.url, key) for _ in range(8)] == [200] * 8
        assert proc.stop() == 0
        assert not [pid for pid in started.workers if is_worker(pid)]
        assert not metrics_dir.exists()

        killed = started.supervisor(spawn_edge, env, "kill")
        orphans = started.see(killed.pid)
        assert killed.proc is not None
        killed.proc.kill()
        killed.proc.wait(10)
        assert wait_until(lambda: not any(is_worker(pid) for pid in orphans), 6), orphans
    finally:
        started.cleanup()


# 5. fail-open remembers what this instance was told


def test_fail_open_honours_this_instances_admin_changes(
    spawn_edge: Spawn, redis_factory: Callable[..., RedisServer], upstream: FakeUpstream
) -> None:
    """Keys A, B, C, D warmed with a 200 each; A revoked, B paused, C rotated (grace 0) through
    this instance's admin API; Redis killed: A, B and C's old key are not admitted (401 or
    503), D still is."""
    server = redis_factory()
    env = edge_env(
        server.url,
        upstream.url,
        EDGE_REDIS_FAIL_OPEN="true",
        EDGE_REDIS_FAIL_OPEN_AUTH_TTL="60",
        EDGE_ADMIN_TOKEN=TOKEN,
    )
    proc = spawn_edge(env, name="fail-open")
    made = {name: new_key(server.url, "pro") for name in "ABCD"}
    with httpx.Client(base_url=proc.url, timeout=10) as client:
        for name, (key, _) in made.items():
            assert client.get("/v1/models", headers=auth(key)).status_code == 200, name
        with admin(proc) as api:
            answer(api.post(f"/keys/{made['A'][1].id}/revoke"), 200)
            answer(api.post(f"/keys/{made['B'][1].id}/pause"), 200)
            answer(api.post(f"/keys/{made['C'][1].id}/rotate", json={"grace_seconds": 0}), 200)

        server.kill()
        statuses = {
            name: client.get("/v1/models", headers=auth(made[name][0])).status_code
            for name in "ABCD"
        }
    assert all(statuses[name] in (401, 503) for name in "ABC"), statuses
    assert statuses["D"] == 200, statuses


# 6. control characters in names and owners


def test_control_characters_in_names_and_owners_are_refused(
    admin_edge: EdgeProcess, redis_server: RedisServer
) -> None:
    """C1, bidi and U+2028/U+2029 in `name` or `owner`: 422 `invalid_value` naming the field
    on create and patch, a non-zero exit from the CLI; accents, CJK and emoji (a ZWJ sequence
    included) are still accepted by both."""
    with admin(admin_edge) as client:
        kid = answer(client.post("/keys", json={"plan": "free", "owner": owner()}), 201)["id"]
        for char in BAD_TEXT_CHARS:
            for field in ("name", "owner"):
                value = f"acme{char}31m prod"
                fields = {"name": "n", "owner": owner(), field: value}
                resp = client.post("/keys", json={"plan": "free", **fields})
                error(resp, 422, "invalid_value", field)
                error(
                    client.patch(f"/keys/{kid}", json={field: value}), 422, "invalid_value", field
                )
        for text in GOOD_TEXT:
            body = {"plan": "free", "name": text, "owner": owner()}
            created = answer(client.post("/keys", json=body), 201)
            assert created["name"] == text
            patched = answer(client.patch(f"/keys/{kid}", json={"owner": text}), 200)
            assert patched["owner"] == text

    url = redis_server.url
    for flag, char in (("--name", "\u009b"), ("--name", "\u202e"), ("--owner", "\u2028")):
        done = run_cli("keys", "create", "--plan", "free", flag, f"x{char}31m", redis_url=url)
        cli_refused(done, flag.lstrip("-"))
    done = run_cli("keys", "update", kid, "--name", "evil\u2066txt", redis_url=url)
    cli_refused(done, "name")
    done = run_cli(
        "keys", "create", "--plan", "free", "--name", GOOD_TEXT[2], "--json", redis_url=url
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["name"] == GOOD_TEXT[2]
