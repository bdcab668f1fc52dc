"""A burst of new streams against an https upstream: what the TLS handshakes of a cold pool
cost, for edge and for nginx, beside the same burst over plain http.

    .venv/bin/python -m benchmarks.tls_burst [--streams 200] [--within-ms 100] [--bursts 3]

Real providers are https; `make bench` measures a plain-http upstream on loopback. Here the
compiled SSE upstream (benchmarks/go/ssebench) serves https with a private CA made for the
run (tests/support/tls.py), and each proxy starts with an empty pool (edge: a fresh process;
nginx: `proxy_pass https://` with its default session reuse) or, for edge with
`upstream.min_connections`, with that many opened at start-up; takes one stream (code paths
warm), then `--bursts` bursts in a row, each `--streams` streams
opened within `--within-ms`, 10 chunks 20 ms apart. The first burst opens about one upstream
connection per stream; the later ones find them pooled. Per burst: time to first event
p50 / p99 and the proxy's CPU per chunk.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.capacity import GoUpstream, TlsGoUpstream, build, streams
from benchmarks.fleet import Fleet, Target
from tests.support.edge_process import EdgeProcess, edge_env
from tests.support.nginx import Nginx
from tests.support.tls import make_certs


def bursts(binary: Path, target: Target, args: argparse.Namespace) -> str:
    streams(binary, target, 1, 10, 3)  # code paths warm, one pooled connection
    shown = []
    for _ in range(args.bursts):
        r = streams(binary, target, args.streams, args.within_ms, 10)
        shown.append(
            f"TTFB p50 {r['ttfb']['p50_ms']:6.1f} p99 {r['ttfb']['p99_ms']:6.1f} ms, "
            f"{r.get('cpu_us_per_chunk', 0):4.0f} µs/chunk"
            + (f", {r['failed_streams']} failed" if r["failed_streams"] else "")
        )
    return " | ".join(shown)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--within-ms", type=int, default=100)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument(
        "--min-connections",
        type=int,
        default=200,
        help="edge also runs with upstream.min_connections at this (0: only without)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edge-tls-") as name, Fleet(Path(name)) as fleet:
        tmp = Path(name)
        certs = make_certs(tmp / "certs")
        binary = build(tmp)
        plain = GoUpstream(binary).start()
        fleet.callback(plain.stop)
        tls = TlsGoUpstream(binary, certs).start()
        fleet.callback(tls.stop)
        print(f"{args.bursts} bursts of {args.streams} streams within {args.within_ms} ms:")
        for scheme, port in (("http", plain.port), ("https", tls.port)):
            ca_cert = certs.ca_cert if scheme == "https" else None
            nginx = Nginx(tmp / f"nginx-{scheme}", [port], ca_cert).start()
            target = Target("nginx", "nginx", nginx.port, nginx.pid)
            print(f"  nginx, {scheme} upstream: {bursts(binary, target, args)}", flush=True)
            nginx.stop()
            host = "localhost" if scheme == "https" else "127.0.0.1"
            extra = {"EDGE_UPSTREAM_CA_FILE": str(certs.ca_cert)} if scheme == "https" else {}
            for warm in sorted({0, args.min_connections}):
                env = edge_env(
                    fleet.redis.url,
                    f"{scheme}://{host}:{port}/v1",
                    EDGE_LOG_LEVEL="warning",
                    EDGE_UPSTREAM_MIN_CONNECTIONS=str(warm),
                    **extra,
                )
                edge = EdgeProcess(tmp, env, f"edge-{scheme}-{warm}").start()
                target = Target("edge", "edge", edge.port, edge.pid, key=fleet.key, edge=True)
                shown = bursts(binary, target, args)
                print(f"  edge (1 worker, min_connections {warm}), {scheme}: {shown}", flush=True)
                edge.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
