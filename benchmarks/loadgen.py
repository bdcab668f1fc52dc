"""wrk, run and read: one bounded load run against one URL."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

POST_SCRIPT = """
wrk.method = "POST"
wrk.body = '{"model":"bench","messages":[{"role":"user","content":"hi"}]}'
wrk.headers["Content-Type"] = "application/json"
"""


@dataclass
class LoadResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int


def wrk_binary() -> str:
    binary = shutil.which("wrk")
    if binary is None:
        raise RuntimeError("wrk is not installed (scripts/ensure-packages.sh wrk=wrk)")
    return binary


def write_script(directory: Path) -> Path:
    path = directory / "post.lua"
    path.write_text(POST_SCRIPT)
    return path


def run_wrk(
    url: str, connections: int, seconds: float, script: Path, key: str | None = None
) -> LoadResult:
    """`wrk -t1 -cN -dS --latency`; bounded by its own duration plus a margin."""
    args = [wrk_binary(), "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    args += ["--timeout", "5s", "-s", str(script)]
    if key:
        args += ["-H", f"Authorization: Bearer {key}"]
    done = subprocess.run(
        [*args, url], capture_output=True, text=True, timeout=seconds + 30, check=True
    )
    return parse_wrk(done.stdout)


def parse_wrk(out: str) -> LoadResult:
    def number(pattern: str) -> str:
        m = re.search(pattern, out)
        if m is None:
            raise ValueError(f"wrk output has no {pattern!r}:\n{out}")
        return m.group(1)

    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return LoadResult(
        rps=float(number(r"Requests/sec:\s+([\d.]+)")),
        p50_ms=_latency(out, "50"),
        p99_ms=_latency(out, "99"),
        requests=int(number(r"(\d+) requests in")),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
    )


def _latency(out: str, percentile: str) -> float:
    m = re.search(rf"^\s+{percentile}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    if m is None:
        raise ValueError(f"wrk output has no {percentile}% latency:\n{out}")
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
