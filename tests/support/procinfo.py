"""What a process holds, read from /proc (the test plan's helpers `rss`, `fd_count`, `estab_to`; the
benchmark's `tree`, `cpu_seconds`)."""

from __future__ import annotations

import os
from pathlib import Path


def rss(pid: int) -> int:
    """Resident set size in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def reset_peak_rss(pid: int) -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) of `pid`; its RSS now."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return rss(pid)


def peak_rss(pid: int) -> int:
    """The most resident memory `pid` has had (VmHWM; since `reset_peak_rss`, if called), in
    bytes: a peak that a buffer freed since no longer shows in RSS."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for {pid}")


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


def accepted_by(pids: list[int], port: int) -> dict[int, int]:
    """Established connections to local `port` (IPv4) held by each of `pids`: socket inodes
    from /proc/<pid>/fd matched to /proc/net/tcp."""
    inodes: dict[str, int] = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[target[8:-1]] = pid
    held = dict.fromkeys(pids, 0)
    local = f":{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and fields[1].endswith(local) and fields[9] in inodes:
            held[inodes[fields[9]]] += 1
    return held


def workers_of(pid: int) -> list[int]:
    """The worker processes a supervisor started (spawned interpreters, not its helpers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants (a supervisor and its workers, nginx and its worker)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                found += tree(int(child))
            except OSError:  # it exited meanwhile
                continue
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    return sum(_or_zero(cpu_seconds, p) for p in tree(pid))


def tree_rss(pid: int) -> int:
    return sum(int(_or_zero(rss, p)) for p in tree(pid))


def _or_zero(read: object, pid: int) -> float:
    try:
        return float(read(pid))  # type: ignore[operator]
    except (OSError, RuntimeError):
        return 0.0
