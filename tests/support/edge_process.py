"""`edge serve` as a real process on a free loopback port, its log collected to a file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.process import LocalServer

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config" / "edge.toml"
PROVIDER_KEY = "sk-provider-test-0123456789abcdef"


class EdgeProcess(LocalServer):
    def __init__(
        self,
        log_dir: Path,
        env: dict[str, str],
        name: str = "edge",
        args: tuple[str, ...] = (),
        wrapper: tuple[str, ...] = (),  # a command edge runs under (the benchmarks: valgrind)
    ) -> None:
        super().__init__()
        self.args = args
        self.wrapper = wrapper
        self.log_path = log_dir / f"{name}-{self.port}.log"
        self.env = env

    def start(self, timeout: float = 20.0) -> EdgeProcess:
        env = inherited_env()
        env.update({"EDGE_CONFIG": str(CONFIG), "PYTHONUNBUFFERED": "1"})
        env.update(self.env)
        log = open(self.log_path, "ab")  # noqa: SIM115
        command = [sys.executable, "-m", "edge", "serve", "--port", str(self.port), *self.args]
        self.proc = subprocess.Popen(
            [*self.wrapper, *command],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.log_path.parent,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"edge exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1, trust_env=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"edge did not become healthy:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        return self.halt(signal.SIGTERM, 15)  # edge drains, then exits 0


def run_cli(
    *args: str, redis_url: str | None, **env_extra: str
) -> subprocess.CompletedProcess[str]:
    """`python -m edge *args` as a user runs it; `redis_url=None` leaves EDGE_REDIS_URL unset."""
    env = inherited_env()
    env["EDGE_CONFIG"] = str(CONFIG)
    if redis_url is not None:
        env["EDGE_REDIS_URL"] = redis_url
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-m", "edge", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )


PROXY_VARIABLES = frozenset({"http_proxy", "https_proxy", "no_proxy", "all_proxy"})


def inherited_env() -> dict[str, str]:
    """This process's environment for an edge process, less every EDGE_ setting and the
    proxy variables (a runner's HTTP_PROXY would send edge's loopback upstream calls to it):
    a test sets what it means to."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("EDGE_") and k.lower() not in PROXY_VARIABLES
    }


def auth(key: str, **extra: str) -> dict[str, str]:
    """Request headers carrying `key`, plus any extra ones (fake-upstream knobs)."""
    return {"Authorization": f"Bearer {key}", **extra}


def admin_json(
    proc: EdgeProcess, token: str, method: str, path: str, body: Any = None
) -> dict[str, Any]:
    """One admin API call that must succeed (200 or 201): its JSON object."""
    resp = httpx.request(
        method, f"{proc.url}/admin{path}", headers=auth(token), json=body, timeout=10
    )
    assert resp.status_code in (200, 201), resp.text
    data = resp.json()
    assert isinstance(data, dict)
    return data


def edge_env(redis_url: str, upstream_url: str, **extra: str) -> dict[str, str]:
    env = {
        "EDGE_REDIS_URL": redis_url,
        "EDGE_UPSTREAM_URL": upstream_url,
        "EDGE_UPSTREAM_API_KEY": PROVIDER_KEY,
        "EDGE_LOG_LEVEL": "debug",
        "EDGE_SERVER_DRAIN_DELAY": "0",  # tests stop processes often; drain tests set their own
    }
    env.update(extra)
    return env
