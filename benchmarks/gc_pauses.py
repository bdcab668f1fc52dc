"""Garbage-collection pauses in an edge worker under load: how often each generation is
collected and how long the loop stands still for it, to tell whether gc explains the chunk
delay tail before anyone touches `gc` thresholds.

    .venv/bin/python -m benchmarks.gc_pauses [--streams 400] [--seconds 5]

Same fleet as `make bench`. edge runs with benchmarks/gcprobe on PYTHONPATH (a sitecustomize
that times each collection through `gc.callbacks`; the bench's edge processes never load it).
Two loads, one after the other: N concurrent SSE streams from the compiled client
(benchmarks/capacity.py; 100 chunks 20 ms apart) and short answers from wrk at 32 connections.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.capacity import GoUpstream, build, streams
from benchmarks.fleet import Fleet
from benchmarks.loadgen import run_wrk, write_script

PROBE = Path(__file__).with_name("gcprobe")


def pauses(pid: int, out: Path) -> dict[str, Any]:
    """What the probe in `pid` saw since its last reset."""
    out.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 5
    while not out.exists() or not out.stat().st_size:
        if time.monotonic() > deadline:
            raise RuntimeError("the gc probe did not answer (is it on the edge's PYTHONPATH?)")
        time.sleep(0.05)
    time.sleep(0.05)
    return dict(json.loads(out.read_text()))


def summary(seen: dict[str, Any], seconds: float) -> list[str]:
    lines = []
    total = 0.0
    for gen, times in sorted(seen["pauses"].items()):
        total += sum(times)
        if not times:
            lines.append(f"  gen {gen}: no collections")
            continue
        ms = sorted(t * 1e3 for t in times)
        p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
        lines.append(
            f"  gen {gen}: {len(ms) / seconds:7.1f}/s  pause p50 {statistics.median(ms):.3f} ms"
            f"  p99 {p99:.3f} ms  max {ms[-1]:.3f} ms"
        )
    lines.append(
        f"  loop stopped for gc: {total / seconds * 1e3:.2f} ms per second "
        f"({total / seconds:.2%}); objects freed: {seen['collected']}; tracked "
        f"{seen['tracked']:,}, frozen {seen['frozen']:,}"
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=400)
    parser.add_argument("--seconds", type=int, default=5, help="of wrk load")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edge-gc-") as tmp, Fleet(Path(tmp)) as fleet:
        out = Path(tmp) / "gc.json"
        wrapper = ("env", f"PYTHONPATH={PROBE}", f"EDGE_GC_PROBE_OUT={out}")
        binary = build(Path(tmp))
        upstream = GoUpstream(binary).start()
        fleet.callback(upstream.stop)
        sse_edge = fleet.edge(upstream.port, wrapper=wrapper)
        assert sse_edge.pid is not None
        streams(binary, sse_edge, 20, 200, 10)  # warm-up
        os.kill(sse_edge.pid, signal.SIGWINCH)  # reset
        started = time.monotonic()
        result = streams(binary, sse_edge, args.streams, 1000, 100)
        seconds = time.monotonic() - started
        print(
            f"{args.streams} streams ({result['events']} chunks in {seconds:.1f} s; added "
            f"delay not computed here, see make bench; chunk delay p99 "
            f"{result['delay']['p99_ms']:.2f} ms, p99.9 {result['delay']['p999_ms']:.2f} ms):"
        )
        print("\n".join(summary(pauses(sse_edge.pid, out), seconds)))

        edge = fleet.edge(fleet.static.port, wrapper=wrapper)
        assert edge.pid is not None
        script = write_script(Path(tmp))
        run_wrk(edge.url, 8, 2, script, edge.key)
        os.kill(edge.pid, signal.SIGWINCH)
        load = run_wrk(edge.url, 32, args.seconds, script, edge.key)
        print(f"short answers, wrk 32 connections ({load.rps:,.0f} req/s, p99 {load.p99_ms} ms):")
        print("\n".join(summary(pauses(edge.pid, out), load.requests / load.rps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
