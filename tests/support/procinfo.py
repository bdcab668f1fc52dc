"""What a process holds, read from /proc (TESTPLAN helpers `rss`, `fd_count`, `estab_to`)."""

from __future__ import annotations

import os
from pathlib import Path


def rss(pid: int) -> int:
    """Resident set size in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def estab_to(port: int) -> int:
    """Established TCP connections to 127.0.0.1:`port` (either direction), from /proc/net/tcp."""
    target = f"0100007F:{port:04X}"
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and target in (fields[1], fields[2]):  # 01: ESTABLISHED
            count += 1
    return count
