"""A real redis-server per test session (or per test), on a free loopback port.

Started and stopped by PID; never port 6379 and never FLUSHALL on a server the tests did not
start. Tests use fresh random key ids instead of flushing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import redis

from tests.support.ports import wait_port
from tests.support.process import LocalServer


class RedisServer(LocalServer):
    scheme = "redis"

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *extra: str,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """`env`: variables added to redis-server's environment (e.g. a libfaketime preload)."""
        super().__init__(port)
        self.dir = directory
        self.extra = list(extra)
        self.env = dict(env or {})

    @property
    def url(self) -> str:
        return super().url + "/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (run scripts/ensure-packages.sh)")
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [
            binary,
            *self.listen_args(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--loglevel",
            "warning",
            *self.extra,
        ]
        log = open(self.dir / f"redis-{self.port}.log", "ab")  # noqa: SIM115
        env = {**os.environ, **self.env} if self.env else None
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        wait_port(self.port)
        client = self.client()
        client.ping()
        client.close()
        return self

    def listen_args(self) -> list[str]:
        """The listener options; a subclass may listen on a TLS port instead."""
        return ["--port", str(self.port)]

    def client(self) -> redis.Redis:
        password = None
        if "--requirepass" in self.extra:
            password = self.extra[self.extra.index("--requirepass") + 1]
        return redis.Redis(port=self.port, socket_timeout=5, password=password)

    def kill(self) -> None:
        """SIGKILL: Redis vanishes as in a crash."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)  # a paused server cannot act on SIGTERM
        self.halt(signal.SIGTERM, 10)

    def restart(self) -> None:
        self.stop()
        deadline = time.monotonic() + 10
        while True:
            try:
                self.start()
                return
            except (OSError, redis.ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
