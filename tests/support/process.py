"""What every server the tests and benchmarks start has in common: a free loopback port, and
a process started and stopped by its PID (never by name, never one the tests did not start)."""

from __future__ import annotations

import subprocess

from tests.support.ports import free_port


class LocalServer:
    scheme = "http"

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def halt(self, sig: int, grace: float) -> int | None:
        """Send `sig`, allow `grace` seconds, then SIGKILL. The exit code (None: never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(10)
        return self.proc.returncode
