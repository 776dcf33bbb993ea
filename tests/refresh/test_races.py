"""Refresh runs racing each other on a real Redis: the lock (one run per model), its fencing
token (a stalled run that lost it cannot flip), the compare-and-set flip, and garbage
collection of a live run's building version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import redis

import refresh.job as job
from refresh.config import RefreshConfig
from refresh.errors import RefreshLockedError, StaleFlipError
from refresh.lock import RefreshLock, lock_holder
from refresh.versions import expire_old
from tests.refresh.support import offline_tables, refresh_config, write_offline
from tests.tiny_model import DIM, MODEL, publish_tiny
from tests.waiting import wait_for
from userembed.registry import Registry
from userembed.vectors import STATUS_BUILDING, STATUS_FAILED, STATUS_READY, VectorStore

N_USERS = 600


@pytest.fixture
def cfg(redis_url: str, registry: Registry, tmp_path: Path) -> RefreshConfig:
    behavior, profile = offline_tables(N_USERS, seed=1)
    offline = write_offline(tmp_path / "offline", behavior, profile)
    publish_tiny(registry, tmp_path / "staging", seed=0)
    return refresh_config(
        registry, redis_url, offline, part_rows=400, batch_size=64, drift_sample=100
    )


def store_of(cfg: RefreshConfig) -> VectorStore:
    return VectorStore(redis.Redis.from_url(cfg.redis_url), cfg.model)


@contextmanager
def cli_run(cfg: RefreshConfig, log: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """`userembed refresh` in a child process, slowed down (100-row parts, a pause each)."""
    cmd = [
        str(Path(sys.executable).with_name("userembed")), "refresh", "--model", MODEL,
        "--part-rows", "100", "--batch-size", "32", "--pause-s", "0.3",
        "--offline-dir", cfg.offline_dir, "--registry-root", cfg.registry_root,
        "--redis-url", cfg.redis_url, *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(timeout=30)


def building(store: VectorStore) -> list[str]:
    return [v.id for v in store.list_versions() if v.status == STATUS_BUILDING]


def test_a_second_run_fails_at_once_naming_the_holder_or_waits_its_turn(cfg, tmp_path):
    store = store_of(cfg)
    first = job.refresh(cfg).embedding_version
    with cli_run(cfg, tmp_path / "a.log") as a:
        wait_for(lambda: building(store) or a.poll() is not None, "run A to start building")
        (a_version,) = building(store)
        with pytest.raises(RefreshLockedError, match=f"pid {a.pid} since") as err:
            job.refresh(cfg)
        assert "\n" not in str(err.value)
        assert building(store) == [a_version]  # B wrote nothing
        b = job.refresh(replace(cfg, lock_wait_s=60))  # waits for A, then runs on top of it
        assert a.wait(timeout=60) == 0, (tmp_path / "a.log").read_text()[-2000:]
    assert b.previous_version == a_version != first
    assert store.current_version() == b.embedding_version
    assert store.version_info(a_version).status == STATUS_READY
    assert lock_holder(store) is None  # released


def test_a_stalled_run_that_lost_its_lock_cannot_flip(cfg, tmp_path):
    store = store_of(cfg)
    first = job.refresh(cfg).embedding_version
    publish_tiny(Registry(cfg.registry_root), tmp_path / "staging", seed=1)
    log = tmp_path / "a.log"
    with cli_run(cfg, log, "--lock-ttl-s", "1", "--no-resume") as a:
        wait_for(lambda: building(store) or a.poll() is not None, "run A to start building")
        (a_version,) = building(store)
        os.kill(a.pid, signal.SIGSTOP)  # a long GC pause, a frozen VM
        wait_for(lambda: lock_holder(store) is None, "A's lock to expire", timeout=10)
        b = job.refresh(replace(cfg, resume=False))
        os.kill(a.pid, signal.SIGCONT)
        assert a.wait(timeout=60) != 0
    assert "refresh lock (token" in log.read_text()
    assert b.previous_version == first
    assert store.current_version() == b.embedding_version  # A never moved readers back
    assert a_version in b.deleted_versions  # no live run builds it: B's collection removed it
    assert store.version_info(a_version) is None
    assert not store.r.exists(store.keys.meta(a_version))  # A wrote no checkpoint after waking


def test_the_flip_is_refused_when_the_pointer_moved_since_validation(cfg, monkeypatch):
    store = store_of(cfg)
    first = job.refresh(cfg).embedding_version
    validate = job._validate

    def validate_then_newer_flip(*args, **kwargs):
        out = validate(*args, **kwargs)
        # a newer version is published between this run's validation and its flip
        store.create_version("newer", "some-model-version")
        store.write("newer", ["1"], np.ones((1, DIM), np.float32), "some-model-version")
        store.publish("newer", users=1)
        return out

    monkeypatch.setattr(job, "_validate", validate_then_newer_flip)
    with pytest.raises(StaleFlipError, match=f"pointer moved.*names newer.*against {first}"):
        job.refresh(cfg)
    assert store.current_version() == "newer"
    (stale,) = [v for v in store.list_versions() if v.id not in (first, "newer")]
    assert stale.status == STATUS_FAILED and "flip refused" in stale.note


def test_gc_keeps_the_building_version_of_the_run_holding_the_lock(cfg):
    store = store_of(cfg)
    mv = Registry(cfg.registry_root).resolve(MODEL, "latest")
    lock = RefreshLock(store, ttl_s=30)
    token = lock.acquire()
    store.create_version("live-building", mv, fence=token)
    store.create_version("dead-building", mv, fence=token - 1 if token > 1 else 0)
    store.create_version("serving", mv)
    store.write("serving", ["1"], np.ones((1, DIM), np.float32), mv)
    store.publish("serving", users=1)

    assert expire_old(store, keep=1) == ["dead-building"]
    assert store.version_info("live-building").status == STATUS_BUILDING
    lock.release()
    assert expire_old(store, keep=1) == ["live-building"]


def test_the_cli_says_in_one_line_that_the_lock_is_held(cfg, capsys):
    from userembed.commands.main import main

    store = store_of(cfg)
    with RefreshLock(store, ttl_s=30).held():
        args = ["refresh", "--model", MODEL, "--redis-url", cfg.redis_url]
        paths = ["--offline-dir", cfg.offline_dir, "--registry-root", cfg.registry_root]
        assert main([*args, *paths]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "another refresh holds the lock" in err


def test_a_checkpoint_write_is_refused_once_the_token_no_longer_holds_the_lock(cfg):
    """The check and the write are one step in Redis: a run stopped between its own lock check
    and a checkpoint write (the stalled run above) cannot recreate a collected version."""
    from refresh.checkpoint import Checkpoint
    from refresh.errors import RefreshLockLostError

    store = store_of(cfg)
    lock = RefreshLock(store, ttl_s=30)
    token = lock.acquire()
    Checkpoint(store, "v1", fence=token).set_fields({"mode": "full"})
    assert store.r.hget(store.keys.meta("v1"), "mode") == b"full"
    lock.release()
    later = RefreshLock(store, ttl_s=30)
    later.acquire()  # the next run, with a larger token
    with pytest.raises(RefreshLockLostError, match=f"refresh lock \\(token {token}\\)"):
        Checkpoint(store, "v2", fence=token).set_fields({"mode": "full"})
    assert not store.r.exists(store.keys.meta("v2"))
    later.release()
    with pytest.raises(RefreshLockLostError):  # no holder at all: refused as well
        Checkpoint(store, "v2", fence=token).set_fields({"mode": "full"})
    assert not store.r.exists(store.keys.meta("v2"))
