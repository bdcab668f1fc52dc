"""A soak run (T30 in docs/testplan.md): mixed traffic over two edge instances for a bounded time
while memory, file descriptors and connections are sampled. The suite runs it briefly with generous
bounds; `benchmarks/soak.py` runs it for minutes and prints the trend.

Traffic, about `rate` requests a second in all: 70% SSE streams, 20% plain calls, 5% clients
that leave mid-stream (half with an RST), 5% invalid keys, and a low-limit key that draws
429s; Redis (with AOF) is restarted half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from edge import keys
from tests.support.edge_process import EdgeProcess, auth, edge_env
from tests.support.fake_upstream import FakeUpstream
from tests.support.keys import new_key
from tests.support.metrics import scrape, value
from tests.support.procinfo import estab_to, fd_count, rss
from tests.support.redis_server import RedisServer


@dataclass
class Sample:
    at: float  # seconds since the start
    rss: list[int]  # bytes, per edge process
    fds: list[int]
    upstream_sockets: int  # established socket ends on the upstream's port
    redis_clients: int


@dataclass
class SoakResult:
    samples: list[Sample] = field(default_factory=list)
    warm: Sample | None = None  # the sample that ends the warm-up
    after: Sample | None = None  # once the load stopped and settled
    statuses: dict[int, int] = field(default_factory=dict)
    inflight: float = 0.0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        assert self.warm is not None and self.after is not None
        mb = 1024 * 1024
        rows = [
            "  t(s)   rss MB (a, b)        fds (a, b)   upstream socks   redis clients",
            *(
                f"{s.at:6.0f}   {s.rss[0] / mb:6.1f} {s.rss[1] / mb:6.1f}       "
                f"{s.fds[0]:4d} {s.fds[1]:4d}   {s.upstream_sockets:14d}   {s.redis_clients:13d}"
                for s in self.samples
            ),
            f"warm-up end RSS {[round(r / mb, 1) for r in self.warm.rss]} MB, "
            f"after {[round(r / mb, 1) for r in self.after.rss]} MB; "
            f"fds {self.warm.fds} -> {self.after.fds}; upstream sockets "
            f"{self.warm.upstream_sockets} -> {self.after.upstream_sockets}; "
            f"statuses {dict(sorted(self.statuses.items()))}; inflight {self.inflight}",
        ]
        return "\n".join(rows)


def _sample(start: float, procs: list[EdgeProcess], up: FakeUpstream, redis: RedisServer) -> Sample:
    try:
        client = redis.client()
        clients = int(client.info("clients")["connected_clients"])
        client.close()
    except Exception:
        clients = -1
    return Sample(
        time.monotonic() - start,
        [rss(p.pid) for p in procs],
        [fd_count(p.pid) for p in procs],
        estab_to(up.port),
        clients,
    )


def _abort(port: int, key: str, rst: bool) -> None:
    """A client that reads the start of a stream, then leaves (FIN or RST)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            "x-fake-chunks: 50\r\nx-fake-gap-ms: 50\r\n\r\n".encode()
        )
        sock.recv(4096)
        if rst:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _one(client: httpx.AsyncClient, proc: EdgeProcess, kind: str, key: str) -> int:
    if kind == "stream":
        headers = auth(key, **{"x-fake-chunks": "5", "x-fake-gap-ms": "20"})
        async with client.stream("GET", f"{proc.url}/v1/models", headers=headers) as resp:
            async for _ in resp.aiter_raw():
                pass
            return resp.status_code
    if kind == "abort":
        await asyncio.to_thread(_abort, proc.port, key, random.random() < 0.5)
        return 0
    return (await client.get(f"{proc.url}/v1/models", headers=auth(key))).status_code


async def _counted(
    client: httpx.AsyncClient, proc: EdgeProcess, kind: str, key: str, result: SoakResult
) -> None:
    try:
        status = await _one(client, proc, kind, key)
    except Exception as exc:  # e.g. a stream cut while Redis restarts: counted, not fatal
        result.errors.append(type(exc).__name__)
        return
    result.statuses[status] = result.statuses.get(status, 0) + 1


async def _traffic(
    procs: list[EdgeProcess], keys_by_kind: dict[str, str], seconds: float, rate: float,
    result: SoakResult,
) -> None:  # fmt: skip
    kinds = ["stream"] * 70 + ["plain"] * 15 + ["limited"] * 5 + ["abort"] * 5 + ["bad"] * 5
    end = time.monotonic() + seconds
    tasks: set[asyncio.Task[None]] = set()
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        while time.monotonic() < end:
            kind = random.choice(kinds)
            key = keys_by_kind.get(kind, keys_by_kind["plain"])
            proc = random.choice(procs)
            task = asyncio.create_task(_counted(client, proc, kind, key, result))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(random.expovariate(rate))
        await asyncio.gather(*tasks)


def soak(
    tmp: Path, up: FakeUpstream, seconds: float, warmup: float, every: float, rate: float = 40
) -> SoakResult:
    """Run the soak; everything it starts is stopped by PID before it returns."""
    redis = RedisServer(tmp / "redis", None, "--appendonly", "yes").start()
    procs: list[EdgeProcess] = []
    result = SoakResult()
    try:
        env = edge_env(redis.url, up.url, EDGE_LOG_LEVEL="warning")
        procs = [EdgeProcess(tmp, env, f"soak-{n}").start() for n in ("a", "b")]
        keys_by_kind = {
            "plain": new_key(redis.url, "team", rpm=100_000, rpd=10_000_000)[0],
            "stream": new_key(redis.url, "team", rpm=100_000, rpd=10_000_000)[0],
            "abort": new_key(redis.url, "team", rpm=100_000, rpd=10_000_000)[0],
            "limited": new_key(redis.url, "free", rpm=10)[0],  # empty within seconds
            "bad": keys.make_key("gw_sk_", keys.new_kid()),
        }
        start = time.monotonic()
        asyncio.run(_traffic(procs, keys_by_kind, warmup, rate, result))
        result.warm = _sample(start, procs, up, redis)
        result.samples.append(result.warm)
        rounds = max(1, int((seconds - warmup) / every))
        for n in range(rounds):
            restart = None
            if n == rounds // 2:  # under load; AOF on: keys survive; edge reloads its scripts
                restart = threading.Timer(every / 2, redis.restart)
                restart.start()
            asyncio.run(_traffic(procs, keys_by_kind, every, rate, result))
            if restart is not None:
                restart.join()
            result.samples.append(_sample(start, procs, up, redis))
        time.sleep(1.5)  # let cut streams and aborted clients settle
        result.after = _sample(start, procs, up, redis)
        result.samples.append(result.after)
        result.inflight = sum(value(scrape(p.url), "edge_inflight_requests") for p in procs)
        return result
    finally:
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.stop()
        redis.stop()
