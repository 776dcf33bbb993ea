"""A throwaway local redis-server: the demo, the native path, tests and benchmarks start one.

One definition of its flags: loopback only, nothing kept on disk (no RDB snapshots, no AOF).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import redis

from userembed.errors import BackendUnavailableError
from userembed.redis_urls import node_url, redacted


def redis_server_argv(port: int, workdir: Path | str | None = None, *extra: str) -> list[str]:
    """argv of a redis-server on 127.0.0.1:`port` that keeps nothing on disk."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise BackendUnavailableError(
            "redis-server is not installed (deploy/native/setup.sh installs it from Debian)"
        )
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    if workdir is not None:
        argv += ["--dir", str(workdir)]
    return argv + list(extra)


def wait_until_up(url: str, timeout_s: float = 10.0) -> None:
    """Block until the Redis at `url` answers PING (a cluster URL: its seed node);
    BackendUnavailableError after `timeout_s`."""
    client = redis.Redis.from_url(node_url(url), socket_connect_timeout=1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError as e:
            if time.monotonic() > deadline:
                raise BackendUnavailableError(f"no Redis answers at {redacted(url)}") from e
            time.sleep(0.05)
        finally:
            client.close()
