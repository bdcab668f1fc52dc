"""LiteLLM's proxy as the Python peer (`make bench ARGS=--with-litellm`).

Installed into its own venv (`.venv-litellm/`, beside edge's, so its pins never touch edge's
dependencies), pointed at the same static upstream, one worker, offline (the model cost map it
ships, no telemetry), started and stopped by PID. Requests carry the proxy's master key: a
LiteLLM *virtual* key needs its PostgreSQL database and Prisma's engine download, which a
loopback-only run cannot have; the master key still runs LiteLLM's auth path on every request.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import httpx

from benchmarks.fleet import Fleet, Target
from tests.support.edge_process import REPO
from tests.support.ports import free_port

VENV = REPO / ".venv-litellm"
MASTER_KEY = "sk-litellm-bench-master"
CONFIG = """
model_list:
  - model_name: bench
    litellm_params:
      model: openai/bench
      api_base: http://127.0.0.1:{upstream}/v1
      api_key: sk-bench
litellm_settings:
  telemetry: false
  drop_params: true
general_settings:
  master_key: {master}
"""


@dataclass
class LiteLLM:
    target: Target
    version: str
    notes: list[str] = field(default_factory=list)


def install(version: str) -> Path:
    """The venv's `litellm` command, installing `litellm[proxy]==version` on first use."""
    binary = VENV / "bin" / "litellm"
    marker = VENV / f".installed-{version}"
    if not marker.exists():
        print(f"installing litellm[proxy]=={version} into {VENV} (first use)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=300)
        subprocess.run(
            [str(VENV / "bin" / "pip"), "install", "--quiet", f"litellm[proxy]=={version}"],
            check=True,
            timeout=1200,
        )
        marker.touch()
    return binary


def start_litellm(fleet: Fleet, directory: Path) -> LiteLLM:
    version = metadata.version("litellm")  # the release edge's own compatibility tests pin
    binary = install(version)
    config = directory / "litellm.yaml"
    config.write_text(CONFIG.format(upstream=fleet.static.port, master=MASTER_KEY))
    port = free_port()
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        "LITELLM_MODE": "PRODUCTION",
        "DISABLE_SCHEMA_UPDATE": "True",
    }
    log = open(directory / "litellm.log", "ab")  # noqa: SIM115
    args = ["--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        [str(binary), *args, "--num_workers", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=directory,
    )
    log.close()
    fleet.callback(_stop, proc)
    _wait_ready(proc, port, directory / "litellm.log")
    target = Target(
        "litellm",
        f"LiteLLM proxy {version}, 1 worker",
        port,
        proc.pid,
        key=MASTER_KEY,
    )
    notes = [f"LiteLLM {version} measured with its master key (virtual keys need PostgreSQL)"]
    return LiteLLM(target, version, notes)


def _wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"LiteLLM exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            probe = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                headers={"Authorization": f"Bearer {MASTER_KEY}"},
                json={"model": "bench", "messages": [{"role": "user", "content": "hi"}]},
                timeout=5,
            )
            if probe.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"LiteLLM did not answer in {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
