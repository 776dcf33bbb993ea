"""A real three-master Redis Cluster on free loopback ports, owned by the test session.

Each node is `redis-server --cluster-enabled yes` with nothing kept on disk (the one set of
flags of userembed/local_redis.py); `redis-cli --cluster create` joins them, no replicas. The
`redis_cluster` fixture (tests/conftest.py) starts one per session; `redis_cluster_url` empties
it before each test.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis
from redis.cluster import RedisCluster

from userembed.local_redis import redis_server_argv, wait_until_up
from userembed.redis_urls import CLUSTER_SCHEMES

MASTERS = 3


def _free_ports(n: int) -> list[int]:
    """n distinct free ports whose cluster bus ports (port + 10000) are free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


class RedisClusterServers:
    """Three cluster-enabled redis-servers joined into one cluster (all 16384 slots)."""

    def __init__(self, workdir: Path, masters: int = MASTERS) -> None:
        self.workdir = workdir
        self.ports = _free_ports(masters)
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """The userembed spelling of "this Redis is a cluster" (one seed node)."""
        return f"{CLUSTER_SCHEMES[0]}://127.0.0.1:{self.ports[0]}"

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        argv = redis_server_argv(
            port,
            self.workdir,
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",  # the node's identity and slots: a restart keeps them
            str(self.workdir / f"nodes-{port}.conf"),
            "--daemonize",
            "no",
        )
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self, timeout_s: float = 20.0) -> None:
        self.procs = [self._spawn(port) for port in self.ports]
        for port in self.ports:
            wait_until_up(f"redis://127.0.0.1:{port}")
        cli = shutil.which("redis-cli")
        assert cli is not None, "redis-cli is not installed"
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        subprocess.run(
            [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=timeout_s,
        )
        self.wait_ok(timeout_s)

    def wait_ok(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(self._state_ok(p) for p in self.ports):
            if time.monotonic() > deadline:
                raise RuntimeError("redis cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def stop_master(self, port: int) -> None:
        """Stop one master (its keys are lost: nothing is kept on disk); `restart_master` brings
        it back with its slots."""
        proc = self.procs[self.ports.index(port)]
        proc.terminate()
        proc.wait(timeout=10)

    def restart_master(self, port: int) -> None:
        self.procs[self.ports.index(port)] = self._spawn(port)
        wait_until_up(f"redis://127.0.0.1:{port}")
        self.wait_ok()

    @staticmethod
    def _state_ok(port: int) -> bool:
        try:
            return redis.Redis(port=port).cluster("INFO").get("cluster_state") == "ok"
        except redis.ConnectionError:
            return False

    def node(self, port: int) -> redis.Redis:
        """A plain client of one master (to see which keys landed where)."""
        return redis.Redis(port=port)

    def client(self) -> RedisCluster:
        return RedisCluster(host="127.0.0.1", port=self.ports[0])

    def keys_per_master(self, pattern: str) -> dict[int, int]:
        """How many keys matching `pattern` each master holds."""
        return {p: sum(1 for _ in self.node(p).scan_iter(match=pattern)) for p in self.ports}

    def flush(self) -> None:
        for port, proc in zip(self.ports, self.procs, strict=True):
            if proc.poll() is not None:  # a test stopped it and failed before restarting it
                self.restart_master(port)
            self.node(port).flushall()

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs = []
