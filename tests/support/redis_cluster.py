"""A real Redis Cluster on loopback (the test plan's `redis_cluster` fixture): N masters (and as
many replicas each as asked), started and stopped by PID, ready when CLUSTER INFO says
`cluster_state:ok` everywhere and every replica's link to its master is up."""

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
    def __init__(self, directory: Path, masters: int = 3, replicas: int = 0) -> None:
        self.replicas = replicas
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
                "--repl-diskless-sync-delay",
                "0",
            )
            for i in range(masters * (1 + replicas))
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
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 30
        while True:
            states = [self._ready(n) for n in self.nodes]
            if all(states):
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ready: {states}")
            time.sleep(0.05)

    @staticmethod
    def _ready(node: RedisServer) -> bool:
        client = node.client()
        try:
            if client.cluster("info")["cluster_state"] != "ok":
                return False
            info = client.info("replication")
            return info["role"] == "master" or info.get("master_link_status") == "up"
        finally:
            client.close()

    def masters(self) -> list[RedisServer]:
        """The nodes that are masters now (a failover changes which)."""
        out = []
        for node in self.nodes:
            if node.proc is None or node.proc.poll() is not None:
                continue
            client = node.client()
            try:
                if client.info("replication")["role"] == "master":
                    out.append(node)
            finally:
                client.close()
        return out

    def node_for(self, key: str) -> RedisServer:
        """The master that owns `key`'s slot (asking a node that is up)."""
        alive = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
        client = alive[0].client()
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
