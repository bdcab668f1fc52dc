"""Instructions edge executes per request, counted by callgrind: a noise-free A/B measure.

    .venv/bin/python -m benchmarks.instructions [--requests 2000] [--connections 4] [--metered]

Wall-clock numbers on a shared 2-core machine move by ±5 % from run to run; the instruction
count of the same build moves by well under 1 %, so it shows what a change to the request
path costs or saves before a `make bench` run can. It counts user-space work only (not the
kernel's share of syscalls: compare syscall counts separately). Same fleet as `make bench`;
edge runs under `valgrind --tool=callgrind` (installed with apt when missing), instrumentation on
only while the measured requests run.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.fleet import Fleet, Target
from tests.support.edge_process import REPO

REQUEST = b'{"model":"bench","messages":[{"role":"user","content":"hi"}]}'


async def load(target: Target, requests: int, connections: int) -> None:
    headers = {"Authorization": f"Bearer {target.key}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(headers=headers, timeout=120) as client:

        async def worker(count: int) -> None:
            for _ in range(count):
                response = await client.post(target.url, content=REQUEST)
                response.raise_for_status()

        await asyncio.gather(*(worker(requests // connections) for _ in range(connections)))


def total_instructions(directory: Path) -> int:
    best = 0
    for dump in directory.glob("callgrind.out*"):
        text = subprocess.run(
            ["callgrind_annotate", str(dump)], capture_output=True, text=True, check=False
        ).stdout
        m = re.search(r"([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", text)
        if m:
            best = max(best, int(m.group(1).replace(",", "")))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument(
        "--metered", action="store_true", help="with a metered key (a token limit never hit)"
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        ensure = REPO / "scripts" / "ensure-packages.sh"
        if subprocess.run(["bash", str(ensure), "valgrind=valgrind"]).returncode != 0:
            sys.exit("valgrind is needed and could not be installed (apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="edge-cg-") as tmp, Fleet(Path(tmp)) as fleet:
        out = Path(tmp) / "cg"
        out.mkdir()
        wrapper = (
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}/callgrind.out",
        )
        edge = fleet.edge(fleet.static.port, wrapper=wrapper)
        if args.metered:
            edge = fleet.metered(edge, fleet.metered_key)
        asyncio.run(load(edge, 200, args.connections))  # warm-up: pools, caches, first calls
        control = ["callgrind_control"]
        subprocess.run([*control, "-i", "on", str(edge.pid)], check=True, capture_output=True)
        asyncio.run(load(edge, args.requests, args.connections))
        subprocess.run([*control, "-i", "off", str(edge.pid)], check=True, capture_output=True)
        subprocess.run([*control, "-d", str(edge.pid)], check=True, capture_output=True)
        time.sleep(1)
        total = total_instructions(out)
    print(f"{total // args.requests:,} instructions per request ({args.requests} requests)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
