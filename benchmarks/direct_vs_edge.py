"""edge against calling the upstream directly, in one run, on this machine.

Starts (by PID, loopback only) a redis-server, an nginx serving a fixed ~300-byte chat
completion, and one `edge serve` process in front of it; then runs wrk against nginx directly
and through edge, alternating A B A B, and prints requests/s, p50/p99 latency, the latency edge
adds, edge's CPU per request and Redis commands per admitted request.

    .venv/bin/python benchmarks/direct_vs_edge.py [--seconds 8] [--reps 2]

Needs `wrk`, `nginx` and `redis-server` (Debian packages: wrk, nginx-light, redis-server).
Numbers from a shared 2-core machine are noisy: compare ratios from the same run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge.keys import record_key  # noqa: E402

BODY = (
    '{"id":"chatcmpl-bench","object":"chat.completion","created":0,"model":"bench",'
    '"choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the bench '
    'upstream."},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":6,'
    '"total_tokens":15}}'
)
WRK_LUA = """
wrk.method = "POST"
wrk.body = '{"model":"bench","messages":[{"role":"user","content":"hi"}]}'
wrk.headers["Content-Type"] = "application/json"
"""
SCRIPT_INNER = ("hmget", "time", "hset", "pexpire", "hincrby")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} never opened")


def need(binary: str) -> str:
    path = shutil.which(binary) or (
        f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None
    )
    if path is None:
        sys.exit(f"{binary} not found: apt-get install -y wrk nginx-light redis-server")
    return path


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(
    url: str, connections: int, seconds: int, script: Path, key: str | None
) -> dict[str, float]:
    args = [need("wrk"), "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script)]
    if key:
        args += ["-H", f"Authorization: Bearer {key}"]
    out = subprocess.run([*args, url], capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    lat = {p: _ms(re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)) for p in ("50", "99")}
    return {
        "rps": rps,
        "p50": lat["50"],
        "p99": lat["99"],
        "requests": total,
        "errors": int(non2xx.group(1)) if non2xx else 0,
    }


def _ms(m: re.Match[str] | None) -> float:
    assert m is not None
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--get", action="store_true", help="GET /v1/models instead of a POST")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        rport, nport, eport = free_port(), free_port(), free_port()
        procs.append(
            subprocess.Popen(
                [
                    need("redis-server"),
                    "--port",
                    str(rport),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(tmp),
                ],
                stdout=subprocess.DEVNULL,
            )
        )
        conf = tmp / "nginx.conf"
        conf.write_text(
            f"worker_processes 1; daemon off; pid {tmp}/nginx.pid; error_log {tmp}/nginx.err;\n"
            "events { worker_connections 4096; }\n"
            "http { access_log off; keepalive_requests 1000000;\n"
            f"  server {{ listen 127.0.0.1:{nport};\n"
            f"    location / {{ default_type application/json; return 200 '{BODY}'; }} }} }}\n"
        )
        procs.append(subprocess.Popen([need("nginx"), "-c", str(conf), "-p", str(tmp)]))
        wait_port(rport)
        wait_port(nport)
        r = redis.Redis(port=rport)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
        env.update(
            EDGE_REDIS_URL=f"redis://127.0.0.1:{rport}/0",
            EDGE_UPSTREAM_URL=f"http://127.0.0.1:{nport}/v1",
            EDGE_UPSTREAM_API_KEY="sk-bench",
            EDGE_LOG_LEVEL="warning",
            EDGE_CONFIG=str(REPO / "config" / "edge.toml"),
        )
        create = subprocess.run(
            [
                sys.executable,
                "-m",
                "edge",
                "keys",
                "create",
                "--plan",
                "team",
                "--rpm",
                "100000000000",
                "--rpd",
                "100000000000",
                "--json",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        )
        key = re.search(r'"key": "([^"]+)"', create.stdout).group(1)  # type: ignore[union-attr]
        kid = re.search(r'"id": "([^"]+)"', create.stdout).group(1)  # type: ignore[union-attr]
        edge = subprocess.Popen(
            [sys.executable, "-m", "edge", "serve", "--port", str(eport)],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
        )
        procs.append(edge)
        wait_port(eport)
        httpx.get(f"http://127.0.0.1:{eport}/healthz").raise_for_status()

        script = tmp / "post.lua"
        script.write_text("" if args.get else WRK_LUA)
        path = "/v1/models" if args.get else "/v1/chat/completions"
        direct = f"http://127.0.0.1:{nport}{path}"
        proxied = f"http://127.0.0.1:{eport}{path}"
        wrk(proxied, 8, 2, script, key)  # warm-up
        rows: dict[tuple[str, int], list[dict[str, float]]] = {}
        commands = {"evalsha": 0, "other": 0, "requests": 0}
        for conns in (1, 32):
            for _ in range(args.reps):
                for name, url, k in (("direct", direct, None), ("edge", proxied, key)):
                    stats_before = r.info("commandstats")
                    cpu_before = cpu_seconds(edge.pid)
                    result = wrk(url, conns, args.seconds, script, k)
                    if name == "edge":
                        result["cpu_us"] = (
                            (cpu_seconds(edge.pid) - cpu_before) / result["requests"] * 1e6
                        )
                        _count_commands(stats_before, r.info("commandstats"), commands, result)
                    rows.setdefault((name, conns), []).append(result)
        _report(rows, commands, int(r.hget(record_key(kid), "requests") or 0))
        return 0
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def _count_commands(
    before: dict, after: dict, acc: dict[str, int], result: dict[str, float]
) -> None:
    def calls(stats: dict, name: str) -> int:
        return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))

    names = {k[len("cmdstat_") :] for k in after} | {k[len("cmdstat_") :] for k in before}
    acc["evalsha"] += calls(after, "evalsha") - calls(before, "evalsha")
    acc["other"] += sum(
        calls(after, n) - calls(before, n)
        for n in names
        if n not in SCRIPT_INNER and n not in ("evalsha", "info")
    )
    acc["requests"] += int(result["requests"])


def _report(rows: dict, commands: dict[str, int], admitted: int) -> None:
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in rows.items()}
    print(
        "\n| conns | target | req/s | p50 ms | p99 ms | added p50 | added p99 "
        "| rps vs direct | edge CPU µs/req |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for conns in (1, 32):
        d, e = med[("direct", conns)], med[("edge", conns)]
        print(f"| {conns} | direct | {d['rps']:,.0f} | {d['p50']:.3f} | {d['p99']:.3f} | | | | |")
        print(
            f"| {conns} | edge | {e['rps']:,.0f} | {e['p50']:.3f} | {e['p99']:.3f} | "
            f"+{e['p50'] - d['p50']:.3f} | +{e['p99'] - d['p99']:.3f} | "
            f"{e['rps'] / d['rps']:.3f} | {e['cpu_us']:.0f} |"
        )
    errors = sum(x["errors"] for v in rows.values() for x in v)
    print(f"\nnon-2xx answers: {errors}")
    print(
        f"Redis: {commands['evalsha']} EVALSHA and {commands['other']} other top-level commands "
        f"for {commands['requests']} edge requests "
        f"({commands['evalsha'] / max(commands['requests'], 1):.3f} EVALSHA per request; "
        f"key's request counter: {admitted})"
    )


if __name__ == "__main__":
    raise SystemExit(main())
