"""Stream capacity: how many concurrent LLM-style streams a proxy carries before it holds
chunks back, and how long a burst of new streams waits for its first byte.

N concurrent streams (50, 100, 200, 400 by default; 100 chunks 20 ms apart, chunk-completion
sized, started evenly over 1 s) go through the upstream directly, nginx (one worker,
`proxy_buffering off`, a keep-alive pool) and edge with one and two workers, in one run,
targets alternating within each N; then a burst: 200 streams opened within 100 ms; then the
largest N and the burst again to an https upstream (nginx and one edge worker; real providers
are https, and TLS costs a proxy CPU per chunk). Per row:
a chunk's delay (arrival minus the upstream's stamp) p50 / p99 / p99.9, time to first event
p50 / p99, the proxy's CPU per chunk and RSS, failed streams. "added" is a row minus the direct
row of the same N and repetition.

The load is compiled (benchmarks/go/ssebench, built here with Debian's golang-go): a Python
asyncio client saturates one of two cores near 10,000 chunks a second, which 200 streams
already ask for, and would then measure itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.fleet import Fleet, Target
from tests.support.edge_process import REPO
from tests.support.ports import wait_port
from tests.support.process import LocalServer
from tests.support.procinfo import tree_cpu_seconds, tree_rss
from tests.support.tls import Certs, make_certs

SOURCE = REPO / "benchmarks" / "go" / "ssebench"
COUNTS = (50, 100, 200, 400)
CHUNKS, GAP_MS, RAMP_MS = 100, 20, 1000
BURST = (200, 100)  # streams, opened within this many ms
BURST_LABEL = f"burst {BURST[0]} in {BURST[1]} ms"


def build(directory: Path) -> Path:
    """The Go load generator, built from source (Go's build cache lives in `directory`)."""
    subprocess.run(
        ["bash", str(REPO / "scripts" / "ensure-packages.sh"), "go=golang-go"], check=True
    )
    binary = directory / "ssebench"
    env = {**os.environ, "GOCACHE": str(directory / "gocache"), "GOFLAGS": "-mod=mod"}
    env.setdefault("HOME", str(directory))
    subprocess.run(
        [shutil.which("go") or "go", "build", "-o", str(binary), "."],
        cwd=SOURCE,
        env=env,
        check=True,
    )
    return binary


class GoUpstream(LocalServer):
    """`ssebench upstream` on a free loopback port."""

    def __init__(self, binary: Path) -> None:
        super().__init__()
        self.binary = binary

    def start(self) -> GoUpstream:
        self.proc = subprocess.Popen(
            [str(self.binary), "upstream", "-addr", f"127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL,
        )
        wait_port(self.port)
        return self

    def stop(self) -> None:
        self.halt(signal.SIGTERM, 5)


class TlsGoUpstream(GoUpstream):
    """`ssebench upstream` serving https with `certs`' server certificate (localhost)."""

    def __init__(self, binary: Path, certs: Certs) -> None:
        super().__init__(binary)
        self.certs = certs

    def start(self) -> TlsGoUpstream:
        self.proc = subprocess.Popen(
            [
                str(self.binary), "upstream", "-addr", f"127.0.0.1:{self.port}",
                "-tls-cert", str(self.certs.server_cert), "-tls-key", str(self.certs.server_key),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,  # Go logs each handshake a client abandons
        )  # fmt: skip
        wait_port(self.port)
        return self


def streams(binary: Path, target: Target, count: int, ramp_ms: int, chunks: int) -> dict[str, Any]:
    """One client run: `count` streams through `target`, their JSON summary."""
    command = [
        str(binary), "client", "-url", target.url, "-streams", str(count),
        "-chunks", str(chunks), "-gap-ms", str(GAP_MS), "-ramp-ms", str(ramp_ms),
    ]  # fmt: skip
    if target.key:
        command += ["-key", target.key]
    cpu = tree_cpu_seconds(target.pid) if target.pid else 0.0
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    if target.pid:
        used = tree_cpu_seconds(target.pid) - cpu
        result["cpu_us_per_chunk"] = used / max(result["events"], 1) * 1e6
        result["rss_mb"] = tree_rss(target.pid) / 2**20
    return result


def measure_capacity(
    fleet: Fleet, directory: Path, reps: int, counts: tuple[int, ...] = COUNTS,
    chunks: int = CHUNKS, https: bool = True,
) -> list[dict[str, Any]]:  # fmt: skip
    """The rows described in the module's docstring; with `https`, the largest N and the
    burst again to an https upstream (`_over_https`)."""
    binary = build(directory)
    upstream = GoUpstream(binary).start()
    fleet.callback(upstream.stop)
    targets = [
        Target("direct", "upstream, direct", upstream.port, upstream.pid),
        fleet.nginx(upstream.port, name="nginx-sse"),
        fleet.edge(upstream.port),
        fleet.edge(upstream.port, workers=2),
    ]
    for target in targets:  # warm-up: connections, pools, code paths
        streams(binary, target, 20, 200, 10)
    plan = [(count, RAMP_MS, f"{count}") for count in counts]
    plan.append((BURST[0], BURST[1], BURST_LABEL))
    rows: list[dict[str, Any]] = []
    direct: dict[str, list[dict[str, Any]]] = {}  # the direct runs, by plan label
    for count, ramp, label in plan:
        runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        for rep in range(reps):
            order = targets if rep % 2 == 0 else list(reversed(targets))
            for target in order:
                runs[target.name].append(streams(binary, target, count, ramp, chunks))
        for target in targets:
            rows.append(_row(target, count, label, runs[target.name], runs["direct"]))
        direct[label] = runs["direct"]
    if https and counts:
        rows += _over_https(fleet, directory, binary, reps, direct, max(counts), chunks)
    return rows


def _over_https(
    fleet: Fleet, directory: Path, binary: Path, reps: int,
    direct: dict[str, list[dict[str, Any]]], largest: int, chunks: int,
) -> list[dict[str, Any]]:  # fmt: skip
    """The largest N and the burst again, to an https upstream (real providers are https):
    nginx (`proxy_pass https://`, its default session reuse) and edge with one worker, each
    trusting a private CA made for the run. There is no direct https row: "added" is over
    the plain direct run of the same N. Pools are warm (the warm-up, then the N run): a
    cold pool's burst is benchmarks/tls_burst.py's."""
    certs = make_certs(directory / "certs")
    upstream = TlsGoUpstream(binary, certs).start()
    fleet.callback(upstream.stop)
    targets = [
        fleet.nginx(upstream.port, name="nginx-sse-https", ca_cert=certs.ca_cert),
        fleet.edge(upstream.port, ca_cert=certs.ca_cert),
    ]
    for target in targets:
        streams(binary, target, 20, 200, 10)
    rows = []
    plan = ((largest, RAMP_MS, f"{largest}"), (BURST[0], BURST[1], BURST_LABEL))
    for count, ramp, plain in plan:
        runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        for rep in range(reps):
            for target in targets if rep % 2 == 0 else list(reversed(targets)):
                runs[target.name].append(streams(binary, target, count, ramp, chunks))
        for target in targets:
            label = f"{plain}, https upstream"
            rows.append(_row(target, count, label, runs[target.name], direct[plain]))
    return rows


def _row(
    target: Target, count: int, label: str, runs: list[dict[str, Any]],
    direct: list[dict[str, Any]],
) -> dict[str, Any]:  # fmt: skip
    def med(kind: str, name: str, among: list[dict[str, Any]]) -> float:
        return statistics.median(r[kind].get(name, 0.0) for r in among)

    row: dict[str, Any] = {
        "target": target.name.replace("nginx-sse", "nginx"),
        "label": target.label,
        "streams": count,
        "run": label,
        "failed_streams": sum(r["failed_streams"] for r in runs),
        "events": sum(r["events"] for r in runs),
    }
    for kind, names in (("delay", ("p50_ms", "p99_ms", "p999_ms")), ("ttfb", ("p50_ms", "p99_ms"))):
        for name in names:
            row[f"{kind}_{name}"] = med(kind, name, runs)
            if target.name != "direct":
                row[f"added_{kind}_{name}"] = med(kind, name, runs) - med(kind, name, direct)
    row["ttfb_p99_ms_worst"] = max(r["ttfb"].get("p99_ms", 0.0) for r in runs)  # of the reps
    if "cpu_us_per_chunk" in runs[0]:
        row["cpu_us_per_chunk"] = statistics.median(r["cpu_us_per_chunk"] for r in runs)
        row["rss_mb"] = max(r["rss_mb"] for r in runs)
    failures = [r["first_failure"] for r in runs if r["first_failure"]]
    if failures:
        row["first_failure"] = failures[0]
    return row
