"""A real Redis Cluster on loopback ports in a temporary directory, for the tests and the bench.

``redis-server`` (Debian's ``redis-server`` package: Redis 7) runs once per node with cluster mode
on, no persistence, and ``redis-cli --cluster create`` joins them: masters get the 16,384 slots
in equal ranges, replicas (if any) follow them so that a master can fail over.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
MISSING = None if REDIS_SERVER and REDIS_CLI else \
    "redis-server is not installed (apt-get install -y redis-server)"


def free_cluster_port() -> int:
    # Redis Cluster also listens on port + 10000 (the cluster bus): both must be free.
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@dataclass
class Node:
    port: int
    directory: Path
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, extra: tuple[str, ...] = ()) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        assert REDIS_SERVER is not None
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", "1000", "--cluster-replica-validity-factor", "0",
             "--dir", str(self.directory), "--save", "",
             "--appendonly", "no", "--protected-mode", "no", "--logfile", "redis.log", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while self.cli("PING", check=False) != "PONG":
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on {self.port} did not start")
            time.sleep(0.05)

    def cli(self, *args: str, check: bool = True) -> str:
        assert REDIS_CLI is not None
        out = subprocess.run([REDIS_CLI, "-p", str(self.port), *args], capture_output=True,
                             text=True, timeout=10)
        if check and out.returncode:
            raise RuntimeError(f"redis-cli {args}: {out.stderr}")
        return out.stdout.strip()

    def kill(self) -> None:
        """SIGKILL the node's process (what a crashed machine looks like)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class Cluster:
    """``masters`` masters and ``replicas`` replicas per master."""

    directory: Path
    masters: int = 3
    replicas: int = 0
    extra: tuple[str, ...] = ()
    nodes: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A ``redis://`` URL of one live node (any node serves the whole cluster)."""
        node = next(n for n in self.nodes if n.alive())
        return f"redis://{node.address}"

    def start(self) -> Cluster:
        total = self.masters * (1 + self.replicas)
        self.nodes = [Node(free_cluster_port(), self.directory / f"node{i}") for i in range(total)]
        for node in self.nodes:
            node.start(self.extra)
        node = self.nodes[0]
        node_args = [n.address for n in self.nodes]
        if self.masters == 1 and self.replicas == 0:
            # redis-cli refuses a one-master cluster: give the node every slot by hand.
            node.cli("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
        else:
            node.cli("--cluster", "create", *node_args, "--cluster-replicas",
                     str(self.replicas), "--cluster-yes")
        self.wait_ok()
        if self.replicas:
            self.wait_replicas()
        return self

    def wait_replicas(self, timeout: float = 30) -> None:
        """Wait until every replica's link to its master is up (it can then take over)."""
        deadline = time.monotonic() + timeout
        while True:
            infos = [n.cli("INFO", "replication", check=False) for n in self.nodes if n.alive()]
            replicas = [i for i in infos if "role:slave" in i]
            if len(replicas) == self.masters * self.replicas and \
                    all("master_link_status:up" in i for i in replicas):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the replicas did not connect to their masters")
            time.sleep(0.1)

    def wait_ok(self, timeout: float = 30) -> None:
        """Wait until every live node says the cluster is ``ok`` (all slots served)."""
        deadline = time.monotonic() + timeout
        while True:
            states = [n.cli("CLUSTER", "INFO", check=False) for n in self.nodes if n.alive()]
            if states and all("cluster_state:ok" in s for s in states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis Cluster is not ok: {states}")
            time.sleep(0.1)

    def master_nodes(self) -> list[Node]:
        """The live nodes that are masters now."""
        return [n for n in self.nodes if n.alive()
                and "role:master" in n.cli("INFO", "replication", check=False)]

    def flush(self) -> None:
        for node in self.master_nodes():
            node.cli("FLUSHALL", check=False)

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive():
                assert node.process is not None
                node.process.terminate()
                try:
                    node.process.wait(5)
                except subprocess.TimeoutExpired:
                    node.kill()
        shutil.rmtree(self.directory, ignore_errors=True)
