"""Shared fixtures. Integration tests talk to a real redis-server started here on a free port."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.redis_cluster import RedisClusterServers
from userembed.errors import BackendUnavailableError
from userembed.local_redis import redis_server_argv, wait_until_up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A real redis-server process owned by the test session; can be stopped and restarted."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        try:
            argv = redis_server_argv(self.port, self.workdir)
        except BackendUnavailableError as e:
            pytest.fail(str(e))
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until_up(self.url)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's real Redis, emptied before each test."""
    if redis_server.proc is None:
        redis_server.start()
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """A real three-master Redis Cluster (tests/redis_cluster.py), started on first use."""
    cluster = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterServers) -> str:
    """`redis+cluster://` URL of the session's cluster, every master emptied before each test."""
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture(autouse=True)
def similar_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's refresh builds its similar-users indexes in its own folder, not ./var."""
    root = tmp_path / "similar"
    monkeypatch.setenv("USEREMBED_SIMILAR_ROOT", str(root))
    return root
