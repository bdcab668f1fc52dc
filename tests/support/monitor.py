"""Counting the commands clients send to Redis, from outside.

`INFO commandstats` also counts the commands a Lua script calls, so it cannot tell one EVALSHA
from many round trips. MONITOR can: it marks commands run inside scripts with `lua`. A marker
ECHO sent at the end makes the count exact (everything before it has been seen).
"""

from __future__ import annotations

import socket
import threading
import uuid


class CommandCounter:
    """`with CommandCounter(port) as c: …` then `c.commands` is the list of top-level commands
    (name first) that other clients sent while the block ran."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.commands: list[str] = []
        self._lines: list[str] = []
        self._marker = f"edge-test-marker-{uuid.uuid4().hex}"
        self._done = threading.Event()

    def __enter__(self) -> CommandCounter:
        self._sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self._sock.sendall(b"MONITOR\r\n")
        self._file = self._sock.makefile("rb")
        assert self._file.readline().strip() == b"+OK"
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        for raw in self._file:
            line = raw.decode("utf-8", "replace").strip()
            if self._marker in line:
                self._done.set()
                return
            self._lines.append(line)

    def __exit__(self, *exc: object) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(f"ECHO {self._marker}\r\n".encode())
            s.recv(1024)
        finished = self._done.wait(10)
        self._sock.close()
        assert finished, "MONITOR never showed the marker"
        for line in self._lines:
            # +1700000000.123456 [0 127.0.0.1:5555] "EVALSHA" "…"   (scripts: [0 lua])
            if "] " not in line or " lua]" in line:
                continue
            rest = line.split("] ", 1)[1]
            self.commands.append(rest.split(" ", 1)[0].strip('"').upper())
