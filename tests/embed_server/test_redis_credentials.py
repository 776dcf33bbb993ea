"""A Redis with ACLs (the default user disabled, an application user with a password full of
URL and connection-string metacharacters): the stored path (server reads and write-backs, the
refresh) and the Feast path connect with the URL's user and decoded password, the Feast client
has socket timeouts, and the password shows in no log line, error or status line."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import numpy as np
import pytest
import redis

from embed_server.client import EmbeddingClient
from refresh.job import refresh
from tests.conftest import free_port
from tests.embed_server.conftest import DIM, MODEL, publish_tiny
from tests.refresh.support import offline_tables, refresh_config, write_offline
from userembed import feast_ops, paths
from userembed import status as st
from userembed.errors import BackendUnavailableError, InvalidInputError
from userembed.local_redis import redis_server_argv, wait_until_up
from userembed.redis_urls import redacted
from userembed.registry import Registry
from userembed.vectors import VectorStore

USER = "app"
# URL metacharacters ('@', ':', '/', '%'), Feast's separators (',', '='), YAML's (': ', ' #')
PASSWORD = 'S3cr #t: p@ss/w%rd,x="1"'


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A private redis-server: default user off, `app` with PASSWORD; yields (URL, process)."""
    port = free_port()
    proc = subprocess.Popen(
        redis_server_argv(port, tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"redis://{USER}:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/0"
    try:
        wait_until_up(f"redis://127.0.0.1:{port}/0")
        admin = redis.Redis(port=port)
        admin.acl_setuser(USER, enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"],
                          channels=["*"], commands=["+@all"])  # fmt: skip
        admin.acl_setuser("default", enabled=False)
        admin.close()
        with pytest.raises(redis.AuthenticationError):  # the default user is really off
            redis.Redis(port=port).ping()
        yield url, proc
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(timeout=10)


def secret_shown(text: str) -> bool:
    return PASSWORD in text or quote(PASSWORD, safe="") in text


def test_the_stored_path_works_with_an_acl_user(
    acl_redis, start_server, registry: Registry, tmp_path: Path, caplog
):
    url, _ = acl_redis
    caplog.set_level(logging.DEBUG)
    v1 = publish_tiny(registry, tmp_path / "staging", seed=1)
    store = VectorStore(redis.Redis.from_url(url), MODEL)
    store.create_version("ev1", v1)
    store.write("ev1", ["7"], np.full((1, DIM), 0.5, np.float32), v1)
    store.publish("ev1")
    for script_reads in (1, 0):
        srv = start_server(redis_url=url, redis_script_reads=script_reads)
        miss = "5" if script_reads else "6"
        with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
            stored, missed, again = c.get("7"), c.get(miss), c.get(miss)
        assert stored.source == "stored" and np.allclose(stored.vector, 0.5)
        assert (missed.source, again.source) == ("computed", "stored")  # written back

    behavior, profile = offline_tables(50, seed=1)
    summary = refresh(
        refresh_config(
            registry,
            url,
            write_offline(tmp_path / "offline", behavior, profile),
            drift_sample=10,
        )
    )
    assert store.current_version() == summary.embedding_version
    assert not any(secret_shown(r.getMessage()) for r in caplog.records)


def test_the_feast_path_uses_the_user_the_decoded_password_and_socket_timeouts(
    acl_redis, tmp_path: Path, monkeypatch
):
    from feast.infra.online_stores.redis import RedisOnlineStore

    url, proc = acl_redis
    monkeypatch.setenv("USEREMBED_FEAST_REGISTRY", str(tmp_path / "feast" / "registry.db"))
    # The configuration `open_store` hands Feast, and Feast's own Redis client built from it.
    config = feast_ops._repo_config(url + "?socket_timeout=0.5", paths.FEATURE_REPO)
    online = RedisOnlineStore()
    feast_ops.bound_redis_waits(online, config.online_store)  # as open_store does
    client = online._get_client(config.online_store)
    assert client.ping()
    client.hset("feast-probe", "f", "1")
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"]) == (USER, PASSWORD)
    assert (kwargs["socket_connect_timeout"], kwargs["socket_timeout"]) == (2.0, 0.5)
    default = feast_ops._repo_config(url, paths.FEATURE_REPO).online_store.connection_string
    assert f"socket_timeout={feast_ops.FEAST_REPLY_TIMEOUT_S}" in default

    # A stalled Redis: the read fails after the socket timeout instead of holding the thread.
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            client.hget("feast-probe", "f")
            outcome.append(None)
        except redis.RedisError as e:
            outcome.append(e)

    os.kill(proc.pid, signal.SIGSTOP)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=20)
    os.kill(proc.pid, signal.SIGCONT)
    assert outcome and isinstance(outcome[0], redis.TimeoutError)
    assert client.get_retry().get_retries() == 0  # one socket timeout, not four and backoff


def test_no_password_in_errors_or_status_lines(acl_redis, tmp_path: Path, monkeypatch):
    url, _ = acl_redis
    wrong = url.replace(quote(PASSWORD, safe=""), quote(PASSWORD + "x", safe=""))
    with pytest.raises(InvalidInputError) as bad_scheme:
        feast_ops.redis_connection_string(url.replace("redis://", "http://"))
    with pytest.raises(BackendUnavailableError) as unreachable:
        wait_until_up(url.replace(f":{urlsplit(url).port}/", f":{free_port()}/"), timeout_s=0.2)
    monkeypatch.setenv("USEREMBED_HOME", str(tmp_path / "home"))
    shown = []
    for u in (url, wrong):
        monkeypatch.setenv("REDIS_URL", u)
        status = st.gather([], st.ServerProbe("127.0.0.1:1", None))
        shown.append(json.dumps(status.to_dict()) + "\n".join(status.lines()))
    assert "answers" in shown[0] and "no answer" in shown[1]  # the wrong password is refused
    for text in (str(bad_scheme.value), str(unreachable.value), *shown):
        assert not secret_shown(text), text
    assert redacted(url) == f"redis://{USER}:***@127.0.0.1:{urlsplit(url).port}/0"
