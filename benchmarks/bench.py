"""`make bench`: edge against the upstream called directly and against nginx, in one run.

    .venv/bin/python -m benchmarks.bench [--quick] [--seconds 8] [--reps 3] [--with-litellm]

Everything runs on loopback, every process is started and stopped by PID and every load run is
bounded (wrk's duration; streams by their length). Configurations alternate A B C D A B C D at
each connection count and the medians are reported, so slow drift on a shared machine hits all
of them alike: compare ratios from the same run, not numbers from different runs.

Writes benchmarks/results/<date>-<host>.{json,md,png} (or under --out) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import uvloop

from benchmarks import report
from benchmarks.capacity import BURST, CHUNKS, GAP_MS, RAMP_MS, measure_capacity
from benchmarks.fleet import Fleet, Target
from benchmarks.loadgen import run_wrk, write_script
from benchmarks.streams import streams_at_once, summarize
from tests.support.edge_process import REPO
from tests.support.monitor import CommandCounter
from tests.support.procinfo import tree_cpu_seconds, tree_rss

PACKAGES = ("wrk=wrk", "nginx=nginx", "redis-server=redis-server")
SINGLE_STREAM_ROUNDS = 5  # streams run one after another for the 1-stream row, per repetition
COUNTED_REQUESTS = 500  # requests whose Redis commands MONITOR counts, per edge configuration


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 s runs, 1 repetition, 10 chunks")
    parser.add_argument("--seconds", type=int, help="length of each load run (default 8)")
    parser.add_argument("--reps", type=int, help="alternating repetitions (default 3)")
    parser.add_argument("--connections", default="1,32,128", help="comma-separated")
    parser.add_argument("--streams", default="1,50", help="concurrent SSE streams, comma-sep.")
    parser.add_argument("--chunks", type=int, help="SSE chunks per stream (default 50)")
    parser.add_argument("--gap-ms", type=int, default=20, help="SSE gap between chunks")
    parser.add_argument("--with-litellm", action="store_true", help="also LiteLLM's proxy")
    parser.add_argument(
        "--capacity",
        default="50,100,200,400",
        help="stream capacity: concurrent streams, comma-separated; 'off' skips it (--quick "
        "does); benchmarks/capacity.py",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (1 if args.quick else 8)
    args.reps = args.reps or (1 if args.quick else 3)
    args.chunks = args.chunks or (10 if args.quick else 50)
    args.connections = [int(c) for c in args.connections.split(",")]
    off = args.quick or args.capacity == "off"
    args.capacity = () if off else tuple(int(c) for c in args.capacity.split(","))
    args.streams = [int(c) for c in args.streams.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure = subprocess.run(["bash", str(REPO / "scripts" / "ensure-packages.sh"), *PACKAGES])
    if ensure.returncode != 0:
        print("cannot benchmark without wrk, nginx and redis-server", file=sys.stderr)
        return 2
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp, Fleet(Path(tmp)) as fleet:
        edge = fleet.edge(fleet.static.port)
        targets = [fleet.direct(), fleet.nginx(fleet.static.port), edge]
        targets.append(fleet.metered(edge, fleet.metered_key))
        targets.append(fleet.edge(fleet.static.port, access_log=True))
        targets.append(fleet.edge(fleet.static.port, routed=True))
        targets.append(fleet.edge(fleet.static.port, traced=True))
        targets.append(fleet.edge(fleet.static.port, workers=2))
        if (os.cpu_count() or 1) < 2:
            notes.append("only one CPU: the 2-worker row shows contention, not scaling")
        versions = _versions()
        if args.with_litellm:
            from benchmarks.litellm_proxy import start_litellm

            litellm = start_litellm(fleet, Path(tmp))
            targets.append(litellm.target)
            versions["litellm"] = litellm.version
            notes += litellm.notes
        else:
            notes.append("LiteLLM's proxy not measured: pass --with-litellm (it installs it)")
        load = measure_load(targets, args, Path(tmp), fleet)
        stream_targets = [fleet.sse_direct(), fleet.nginx(fleet.sse.port, "nginx")]
        stream_targets.append(fleet.edge(fleet.sse.port))
        streams = measure_streams(stream_targets, args)
        capacity = []
        if args.capacity:
            capacity = measure_capacity(fleet, Path(tmp), args.reps, args.capacity)
        else:
            notes.append("stream capacity not measured (--quick or --capacity off)")
    results: dict[str, Any] = {
        "meta": _meta(args, versions),
        "load": load,
        "streams": streams,
        "streams_meta": {"chunks": args.chunks, "gap_ms": args.gap_ms},
        "capacity": capacity,
        "capacity_meta": {"chunks": CHUNKS, "gap_ms": GAP_MS, "ramp_ms": RAMP_MS},
        "notes": notes,
    }
    results["targets"] = check_targets(results)
    stem = args.out / f"{results['meta']['date']}-{results['meta']['host']}"
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(stem.with_suffix(".json"), results)
    table = report.markdown(results)
    stem.with_suffix(".md").write_text(table)
    report.chart(stem.with_suffix(".png"), results)
    if capacity:
        report.capacity_chart(stem.with_name(stem.name + "-capacity.png"), results)
    print(table)
    print(f"wrote {stem}.json, .md and .png")
    return 0


def measure_load(
    targets: list[Target], args: argparse.Namespace, tmp: Path, fleet: Fleet
) -> list[dict[str, Any]]:
    script = write_script(tmp)
    for target in targets:  # warm-up: connection pools, Lua script cache, first-call paths
        run_wrk(target.url, 8, 1, script, target.key)
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    for conns in args.connections:
        for _ in range(args.reps):
            for target in targets:
                runs.setdefault((target.name, conns), []).append(
                    _one_load_run(target, conns, args.seconds, script)
                )
    commands = {t.name: _commands_per_request(t, fleet) for t in targets if t.edge}
    rows = []
    for conns in args.connections:
        for target in targets:
            row: dict[str, Any] = {
                "target": target.name,
                "label": target.label,
                "connections": conns,
                **_medians(runs[(target.name, conns)]),
                "runs": runs[(target.name, conns)],
            }
            row["errors"] = int(sum(r["errors"] for r in row["runs"]))
            if target.name in commands:
                row["redis_cmds_per_req"] = commands[target.name]
            rows.append(row)
    _relate(rows, "p50_ms", "p99_ms")
    return rows


def _one_load_run(target: Target, conns: int, seconds: int, script: Path) -> dict[str, float]:
    cpu = tree_cpu_seconds(target.pid) if target.pid else 0.0
    result = run_wrk(target.url, conns, seconds, script, target.key)
    run: dict[str, float] = {
        "rps": result.rps,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "requests": result.requests,
        "errors": result.non_2xx + result.socket_errors,
    }
    if target.pid:
        used = tree_cpu_seconds(target.pid) - cpu
        run["cpu_us_per_req"] = used / max(result.requests, 1) * 1e6
        run["rss_mb"] = tree_rss(target.pid) / 2**20
    return run


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.median(r[name] for r in runs) for name in runs[0] if name != "errors"}


def _relate(rows: list[dict[str, Any]], *latencies: str) -> None:
    """Added latency over the direct row and throughput over nginx's, per connection count."""
    for row in rows:
        same = {r["target"]: r for r in rows if r["connections"] == row["connections"]}
        if row["target"] != "direct":
            for name in latencies:
                row[f"added_{name}"] = row[name] - same["direct"][name]
        row["vs_nginx"] = row["rps"] / same["nginx"]["rps"]


def _commands_per_request(target: Target, fleet: Fleet) -> float:
    """Top-level Redis commands (MONITOR; script-internal ones excluded) per admitted request."""
    body = b'{"model":"bench","messages":[{"role":"user","content":"hi"}]}'
    headers = {"Authorization": f"Bearer {target.key}", "Content-Type": "application/json"}
    with httpx.Client(timeout=10) as client:
        client.post(target.url, content=body, headers=headers).raise_for_status()  # warm
        with CommandCounter(fleet.redis.port) as counter:
            for _ in range(COUNTED_REQUESTS):
                client.post(target.url, content=body, headers=headers).raise_for_status()
    return len(counter.commands) / COUNTED_REQUESTS


def measure_streams(targets: list[Target], args: argparse.Namespace) -> list[dict[str, Any]]:
    summaries: dict[tuple[str, int], list[dict[str, float]]] = {}
    for target in targets:  # warm-up
        uvloop.run(streams_at_once(target.port, target.path, target.key, 2, 2, 1))
    for count in args.streams:
        # One stream gives one time to first byte: run a few in a row so the median means
        # something (this VM's wake-up latency alone moves a single sample by 0.5 ms).
        rounds = SINGLE_STREAM_ROUNDS if count == 1 else 1
        for _ in range(args.reps):
            for target in targets:
                timings = []
                for _ in range(rounds):
                    timings += uvloop.run(
                        streams_at_once(
                            target.port, target.path, target.key, count, args.chunks, args.gap_ms
                        )
                    )
                summaries.setdefault((target.name, count), []).append(summarize(timings))
    rows = []
    for count in args.streams:
        for target in targets:
            runs = summaries[(target.name, count)]
            row: dict[str, Any] = {
                "target": target.name,
                "label": target.label,
                "streams": count,
                **{k: statistics.median(r[k] for r in runs) for k in runs[0]},
            }
            row["failed_streams"] = int(sum(r["failed_streams"] for r in runs))
            rows.append(row)
    for row in rows:
        direct = next(r for r in rows if r["streams"] == row["streams"] and r["target"] == "direct")
        if row["target"] != "direct":
            for name in ("chunk_p50_ms", "chunk_p99_ms", "ttfb_p50_ms"):
                row[f"added_{name}"] = row[name] - direct[name]
    return rows


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of issues 15 and 23 against this run's numbers (reported, never asserted):
    short answers against nginx, and the stream capacity of one worker."""
    load = {(r["target"], r["connections"]): r for r in results["load"]}
    streams = {(r["target"], r["streams"]): r for r in results["streams"]}
    capacity = {(r["target"], r["run"]): r for r in results.get("capacity", [])}
    found: list[dict[str, Any]] = []

    def target(what: str, goal: str, value: float | None, ok: bool, fmt: str = ".3f") -> None:
        if value is not None:
            found.append({"what": what, "goal": goal, "measured": format(value, fmt), "met": ok})

    def get(table: dict[Any, dict[str, Any]], key: Any, field: str) -> float | None:
        row = table.get(key)
        return None if row is None or field not in row else float(row[field])

    for name, goal in (("edge-1w", 0.22), ("edge-2w", 0.30)):
        v = get(load, (name, 32), "vs_nginx")
        target(f"{name} throughput x nginx, 32 conns", f"≥ {goal}", v, v is not None and v >= goal)
    for field, goal in (("added_p50_ms", 0.22), ("added_p99_ms", 1.0)):
        v = get(load, ("edge-1w", 1), field)
        target(f"edge-1w {field}, 1 conn", f"≤ {goal} ms", v, v is not None and v <= goal)
    for field, goal in (("added_chunk_p50_ms", 0.15), ("added_chunk_p99_ms", 1.5)):
        v = get(streams, ("edge-1w", 50), field)
        target(f"edge {field}, 50 streams", f"≤ {goal} ms", v, v is not None and v <= goal)
    v = get(streams, ("edge-1w", 1), "added_ttfb_p50_ms")
    target("edge added TTFB, 1 stream", "≤ 1 ms", v, v is not None and v <= 1.0)
    burst = f"burst {BURST[0]} in {BURST[1]} ms"
    for run, field, goal in (
        ("400", "added_delay_p99_ms", 5.0),
        ("400", "added_delay_p999_ms", 10.0),
        ("400", "ttfb_p99_ms", 10.0),
        ("200", "added_delay_p99_ms", 2.0),
        (burst, "ttfb_p99_ms", 20.0),
    ):
        v = get(capacity, ("edge-1w", run), field)
        where = burst if run == burst else f"{run} streams"
        name = field.replace("delay_", "chunk_")
        target(f"edge-1w {name}, {where}", f"≤ {goal:g} ms", v, v is not None and v <= goal)
    edge, litellm = get(load, ("edge-1w", 32), "rps"), get(load, ("litellm", 32), "rps")
    if edge is not None and litellm:
        target(
            "edge-1w x LiteLLM (1 worker), 32 conns",
            "≥ 40",
            edge / litellm,
            edge >= 40 * litellm,
            ".1f",
        )
    for name in ("edge-1w", "edge-2w"):
        v = get(load, (name, 1), "redis_cmds_per_req")
        target(f"{name} Redis commands per request", "= 1", v, v == 1.0)
    v = get(load, ("edge-1w-metered", 1), "redis_cmds_per_req")
    target("edge-1w, metered key: Redis commands per request", "≤ 2", v, v is not None and v <= 2)
    v = get(load, ("edge-1w-access", 1), "redis_cmds_per_req")
    target(
        "edge-1w, access log: Redis commands per request", "≤ 1.01", v, v is not None and v <= 1.01
    )
    v = get(load, ("edge-1w-routed", 1), "redis_cmds_per_req")
    target("edge-1w, 2 upstreams: Redis commands per request", "= 1", v, v == 1.0)
    v = get(load, ("edge-1w-traced", 1), "redis_cmds_per_req")
    target("edge-1w, tracing on: Redis commands per request", "= 1", v, v == 1.0)
    return found


def _versions() -> dict[str, str]:
    def first(cmd: list[str], pattern: str) -> str:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        m = re.search(pattern, done.stdout + done.stderr)
        return m.group(1) if m else "?"

    found = {
        "python": platform.python_version(),
        "nginx": first(["nginx", "-v"], r"nginx/(\S+)"),
        "wrk": first(["wrk", "-v"], r"wrk (\S+)"),
        "redis": first(["redis-server", "--version"], r"v=(\S+)"),
    }
    for package in ("uvicorn", "httptools", "uvloop", "redis", "starlette"):
        found[package if package != "redis" else "redis-py"] = metadata.version(package)
    return found


def _meta(args: argparse.Namespace, versions: dict[str, str]) -> dict[str, Any]:
    from edge import __version__

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "edge": __version__,
        "commit": (commit or "unknown") + ("-dirty" if dirty else ""),
        "seconds": args.seconds,
        "reps": args.reps,
        "quick": args.quick,
        "versions": versions,
    }


if __name__ == "__main__":
    sys.exit(main())
