"""A real Redis Cluster on loopback (TESTPLAN fixture `redis_cluster`): N masters, started
and stopped by PID, ready when CLUSTER INFO says `cluster_state:ok`."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tests.support.ports import free_port
from tests.support.redis_server import RedisServer


def _cluster_port() -> int:
    """A free port whose cluster-bus port (+10000) is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 < 65536:
            try:
                import socket

                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 10000))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair for a cluster node")


class RedisCluster:
    def __init__(self, directory: Path, masters: int = 3) -> None:
        self.nodes = [
            RedisServer(
                directory / f"node-{i}",
                _cluster_port(),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
            )
            for i in range(masters)
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:2])

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli")
        assert cli is not None
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 15
        while True:
            states = [n.client().cluster("info")["cluster_state"] for n in self.nodes]
            if all(s == "ok" for s in states):
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok: {states}")
            time.sleep(0.05)

    def node_for(self, key: str) -> RedisServer:
        """The master that owns `key`'s slot."""
        client = self.nodes[0].client()
        slot = client.cluster("keyslot", key)
        owner = next(
            primary[1]
            for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS")
            if start <= slot <= end
        )
        client.close()
        return next(n for n in self.nodes if n.port == owner)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
