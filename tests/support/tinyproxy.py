"""Debian's tinyproxy as an egress proxy for tests: its own config file, a free loopback port,
the foreground (`tinyproxy -d -c <conf>`), a log file at LogLevel Info to show what went
through it, and stopped by its PID. `make test` installs it (scripts/ensure-packages.sh).

tinyproxy logs one line per request it reads, e.g.

    CONNECT   Dec 05 01:34:09 [4112]: Request (file descriptor 5): CONNECT 127.0.0.1:443 HTTP/1.1
    CONNECT   Dec 05 01:34:09 [4112]: Request (file descriptor 5): POST http://h:80/v1/x HTTP/1.1

which `requests()` returns as the request lines (`CONNECT 127.0.0.1:443 HTTP/1.1`).
With `basic_auth=(user, password)` it asks for `Proxy-Authorization: Basic …`: 407 without
credentials, and (tinyproxy 1.11) 401 for wrong ones; `answer_to_connect` says what it answers.
"""

from __future__ import annotations

import base64
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.process import LocalServer

REQUEST_LINE = re.compile(r"Request \(file descriptor \d+\): (.*)$")


def tinyproxy_binary() -> str:
    binary = shutil.which("tinyproxy") or next(
        (p for p in ("/usr/bin/tinyproxy", "/usr/sbin/tinyproxy") if Path(p).exists()), None
    )
    if binary is None:
        pytest.fail(
            "tinyproxy is not installed: make test installs it (scripts/ensure-packages.sh; "
            "apt-get install tinyproxy)"
        )
    return binary


class TinyProxy(LocalServer):
    def __init__(self, directory: Path, basic_auth: tuple[str, str] | None = None) -> None:
        super().__init__()
        self.dir = directory
        self.basic_auth = basic_auth
        self.conf = directory / "tinyproxy.conf"
        self.log_path = directory / "tinyproxy.log"
        self.out_path = directory / "tinyproxy.out"

    def url_with(self, user: str, password: str) -> str:
        """The proxy URL with credentials in it."""
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    def config(self) -> str:
        lines = [
            "Listen 127.0.0.1",
            f"Port {self.port}",
            "Allow 127.0.0.1",
            "Timeout 30",
            "MaxClients 64",
            f'LogFile "{self.log_path}"',
            "LogLevel Info",
            # no ConnectPort line: CONNECT to any port (the test upstreams' are random)
        ]
        if self.basic_auth is not None:
            user, password = self.basic_auth
            lines.append(f"BasicAuth {user} {password}")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> TinyProxy:
        binary = tinyproxy_binary()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.config())
        self.log_path.write_text("")
        with open(self.out_path, "ab") as out:
            self.proc = subprocess.Popen(
                [binary, "-d", "-c", str(self.conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.dir,
            )
        deadline = time.monotonic() + timeout
        while "Accepting connections" not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"tinyproxy did not start (exit {self.proc.returncode}):\n"
                    f"{self.out_path.read_text(errors='replace')}\n{self.log()}"
                )
            time.sleep(0.02)
        return self

    def stop(self) -> int | None:
        return self.halt(signal.SIGTERM, 5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def requests(self) -> list[str]:
        """The request lines it has read, oldest first."""
        found = (REQUEST_LINE.search(line) for line in self.log().splitlines())
        return [m.group(1).strip() for m in found if m]

    def answer_to_connect(self, target: str, credentials: tuple[str, str] | None) -> int:
        """The status it answers `CONNECT target` with these credentials (None: none sent)."""
        head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
        if credentials is not None:
            token = base64.b64encode(":".join(credentials).encode()).decode()
            head += f"Proxy-Authorization: Basic {token}\r\n"
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall((head + "\r\n").encode())
            answer = b""
            for _ in range(64):  # a status line is far shorter than 64 reads
                piece = sock.recv(4096)
                answer += piece
                if not piece or b"\r\n" in answer:
                    break
        status = answer.split(b"\r\n", 1)[0].split()
        if len(status) < 2 or not status[1].isdigit():
            raise RuntimeError(f"tinyproxy answered {answer[:200]!r}")
        return int(status[1])
