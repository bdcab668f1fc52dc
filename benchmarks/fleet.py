"""The processes one benchmark run measures, started and stopped by PID, loopback only.

Reuses the test suite's process helpers (tests/support): a real redis-server, nginx as the
static upstream and as the C reference proxy, edge as `edge serve` processes.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.support.edge_process import REPO, EdgeProcess, edge_env, run_cli
from tests.support.nginx import Nginx, StaticNginx
from tests.support.otlp_sink import otlp_sink
from tests.support.ports import wait_port
from tests.support.process import LocalServer
from tests.support.redis_server import RedisServer

# A ~300-byte chat completion: what every plain request gets from the upstream.
BODY = (
    '{"id":"chatcmpl-bench","object":"chat.completion","created":0,"model":"bench",'
    '"choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the bench '
    'upstream."},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":6,'
    '"total_tokens":15}}'
)
PATH = "/v1/chat/completions"


@dataclass
class Target:
    """One configuration under load: where to send requests and which process tree to watch."""

    name: str  # short id: direct, nginx, edge-1w, edge-2w, litellm
    label: str  # what the table says
    port: int
    pid: int | None  # the proxy's process (tree); None for the upstream itself
    key: str | None = None
    path: str = PATH
    edge: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"


class SseUpstream(LocalServer):
    """benchmarks/streams.py's SSE server as its own process."""

    def start(self) -> SseUpstream:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.streams", "--port", str(self.port)], cwd=REPO
        )
        wait_port(self.port)
        return self

    def stop(self) -> None:
        self.halt(signal.SIGTERM, 10)


class Fleet(contextlib.ExitStack):
    """Everything a run needs; `with Fleet(tmp) as fleet:` stops it all, by PID, on the way out."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.dir = directory
        self.redis = RedisServer(directory / "redis")
        self.static = StaticNginx(directory / "upstream", BODY)
        self.sse = SseUpstream()
        self.key = ""
        self.metered_key = ""  # a token limit that is never hit: metered, never refused

    def __enter__(self) -> Fleet:
        super().__enter__()
        try:
            self.redis.start()
            self.callback(self.redis.stop)
            self.static.start()
            self.callback(self.static.stop)
            self.sse.start()
            self.callback(self.sse.stop)
            self.key = self._create_key()
            self.metered_key = self._create_key("--tpm", str(10**11))
        except BaseException:
            self.close()  # __exit__ does not run when __enter__ fails
            raise
        return self

    def _create_key(self, *extra: str) -> str:
        huge = str(10**11)  # the limits are enforced (both buckets, every request) but never hit
        done = run_cli(
            "keys", "create", "--plan", "team", "--rpm", huge, "--rpd", huge, *extra, "--json",
            redis_url=self.redis.url,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"could not create the bench key: {done.stderr}")
        return str(json.loads(done.stdout)["key"])

    def direct(self) -> Target:
        return Target("direct", "upstream, direct", self.static.port, self.static.pid)

    def nginx(self, upstream_port: int, name: str = "nginx", ca_cert: Path | None = None) -> Target:
        """nginx in front of the upstream; `ca_cert`: an https upstream (localhost's cert)."""
        proxy = Nginx(self.dir / f"{name}-{upstream_port}", [upstream_port], ca_cert).start()
        self.callback(proxy.stop)
        label = "nginx proxy_pass (keepalive pool)" + (", https upstream" if ca_cert else "")
        return Target(name, label, proxy.port, proxy.pid)

    def edge(
        self,
        upstream_port: int,
        workers: int = 1,
        wrapper: tuple[str, ...] = (),
        access_log: bool = False,
        routed: bool = False,
        traced: bool = False,
        ca_cert: Path | None = None,
    ) -> Target:
        """An edge process; `access_log`: with `log.access` on (its lines go to the log file,
        as they would to a collector's pipe); `routed`: two `[[upstreams]]` (both this
        upstream) serving the model, so every request is routed by its body's model;
        `ca_cert`: the upstream is https (localhost's certificate, signed by `ca_cert`)."""
        url = f"http://127.0.0.1:{upstream_port}/v1"
        if ca_cert is not None:
            url = f"https://localhost:{upstream_port}/v1"
        env = edge_env(
            self.redis.url,
            url,
            EDGE_LOG_LEVEL="warning",
            EDGE_LOG_ACCESS="true" if access_log else "false",
        )
        if traced:
            env["EDGE_TRACING_OTLP_ENDPOINT"] = self.otlp_sink()
        if ca_cert is not None:
            env["EDGE_UPSTREAM_CA_FILE"] = str(ca_cert)
        if routed:
            del env["EDGE_UPSTREAM_URL"], env["EDGE_UPSTREAM_API_KEY"]
            env["EDGE_UPSTREAMS"] = json.dumps(
                [
                    {"name": "a", "url": url, "models": ["bench*"]},
                    {"name": "b", "url": url, "models": ["bench", "other-*"]},
                ]
            )
        args = ("--workers", str(workers))
        name = (
            f"edge-{workers}w"
            + ("-access" if access_log else "")
            + ("-routed" if routed else "")
            + ("-traced" if traced else "")
            + ("-https" if ca_cert else "")
        )
        proc = EdgeProcess(self.dir, env, name, args, wrapper).start(timeout=300 if wrapper else 60)
        self.callback(proc.stop)
        return Target(
            name,
            f"edge, {workers} worker{'s' if workers > 1 else ''}"
            + (", access log on" if access_log else "")
            + (", 2 upstreams routed by model" if routed else "")
            + (", tracing on (OTLP)" if traced else "")
            + (", https upstream" if ca_cert else ""),
            proc.port,
            proc.pid,
            key=self.key,
            edge=True,
        )

    def otlp_sink(self) -> str:
        """An OTLP/HTTP endpoint that takes every export (tests/support/otlp_sink.py): what is
        measured is edge's cost of making and batching spans, not a collector's."""
        url, server = otlp_sink()
        self.callback(server.shutdown)
        return url

    @staticmethod
    def metered(edge: Target, key: str) -> Target:
        """The same edge process, called with a metered key (a token limit): its usage is read
        from every answer and settled after it, the cost the unmetered row does not pay."""
        return Target(
            f"{edge.name}-metered",
            f"{edge.label}, metered key",
            edge.port,
            edge.pid,
            key,
            edge=True,
        )

    def sse_direct(self) -> Target:
        return Target("direct", "upstream, direct", self.sse.port, self.sse.pid)
