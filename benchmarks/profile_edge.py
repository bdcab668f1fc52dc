"""Where edge's CPU goes under load: py-spy samples one edge worker while wrk drives it.

    .venv/bin/python -m benchmarks.profile_edge [--connections 32] [--seconds 10] [--svg out.svg]
        [--metered]

Same fleet as `make bench` (real redis-server, nginx static upstream, every feature on). Prints
edge's CPU per request and the share of samples per package (self time) and per function
(self and inclusive). Installs py-spy into the venv on first use (it is a profiler, not a
dependency of edge or its tests). Sampling costs edge some throughput: read the shares, and
take req/s from `make bench`.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.fleet import Fleet
from benchmarks.loadgen import run_wrk, write_script
from tests.support.procinfo import cpu_seconds

PACKAGES = (
    ("uvicorn", "/uvicorn/"),
    ("aiohttp", "/aiohttp/"),
    ("yarl/multidict", "/yarl/"),
    ("yarl/multidict", "/multidict/"),
    ("prometheus_client", "/prometheus_client/"),
    ("redis-py", "site-packages/redis/"),
    ("starlette", "/starlette/"),
    ("asyncio", "/asyncio/"),
    ("edge", "/edge/"),
)
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:]*)(?::\d+)?\)$")
LINE = re.compile(r":\d+\)$")


def py_spy() -> str:
    binary = Path(sys.executable).with_name("py-spy")
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "py-spy"], check=True)
    return str(binary)


def package(frame: str) -> str:
    m = FRAME.match(frame)
    if m is None:
        return "other"
    path = "/" + m.group("file")
    if path.endswith("asyncio/runners.py"):
        return "event loop (uvloop, C: I/O and syscalls)"
    for name, marker in PACKAGES:
        if marker in path:
            return name
    return "stdlib, other"


def report(raw: Path, top: int, lines: bool = False) -> None:
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    by_package: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        if not lines:  # functions, not lines
            frames = [LINE.sub(")", frame) for frame in frames]
        total += n
        self_time[frames[-1]] += n
        by_package[package(frames[-1])] += n
        for frame in set(frames):
            inclusive[frame] += n
    print(f"{total} samples")
    print("\nself time by package:")
    for name, n in by_package.most_common():
        print(f"  {n / total:6.1%}  {name}")
    print(f"\ntop {top} functions, self time:")
    for frame, n in self_time.most_common(top):
        print(f"  {n / total:6.1%}  {frame}")
    print(f"\ntop {top} edge and uvicorn functions, inclusive:")
    shown = 0
    for frame, n in inclusive.most_common():
        if frame.split(" (", 1)[-1].startswith(("edge/", "uvicorn/")) and shown < top:
            print(f"  {n / total:6.1%}  {frame}")
            shown += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--svg", type=Path, help="also write a flame graph here")
    parser.add_argument("--lines", action="store_true", help="per line, not per function")
    parser.add_argument(
        "--metered", action="store_true", help="with a metered key (a token limit never hit)"
    )
    args = parser.parse_args()
    spy = py_spy()
    with tempfile.TemporaryDirectory(prefix="edge-profile-") as tmp, Fleet(Path(tmp)) as fleet:
        edge = fleet.edge(fleet.static.port)
        if args.metered:
            edge = fleet.metered(edge, fleet.metered_key)
        assert edge.pid is not None
        script = write_script(Path(tmp))
        run_wrk(edge.url, 8, 2, script, edge.key)  # warm-up
        base = cpu_seconds(edge.pid)
        result = run_wrk(edge.url, args.connections, args.seconds, script, edge.key)
        used = cpu_seconds(edge.pid) - base
        print(
            f"unprofiled: {result.rps:,.0f} req/s, {used / result.requests * 1e6:.0f} µs CPU "
            f"per request at {args.connections} connections"
        )
        raw = Path(tmp) / "profile.txt"
        record = [spy, "record", "--pid", str(edge.pid), "--rate", str(args.rate)]
        record += ["--duration", str(args.seconds), "--nonblocking", "--format", "raw"]
        sampler = subprocess.Popen(
            [*record, "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        run_wrk(edge.url, args.connections, args.seconds + 1, script, edge.key)
        sampler.wait(args.seconds + 30)
        if args.svg:
            svg = [spy, "record", "--pid", str(edge.pid), "--rate", str(args.rate)]
            svg += ["--duration", str(args.seconds), "--nonblocking", "-o", str(args.svg)]
            sampler = subprocess.Popen(svg, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            run_wrk(edge.url, args.connections, args.seconds + 1, script, edge.key)
            sampler.wait(args.seconds + 30)
        report(raw, args.top, args.lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
