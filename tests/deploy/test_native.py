"""The native path: deploy/native/up.sh starts the platform as local processes and down.sh
stops exactly what up.sh started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.deploy import sources
from userembed.local_redis import redis_server_argv

UP = sources.NATIVE / "up.sh"
DOWN = sources.NATIVE / "down.sh"
USEREMBED_BIN = Path(sys.executable).parent / "userembed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("USEREMBED_")}
    env |= {
        "USEREMBED_HOME": str(home),
        "REDIS_URL": redis_url,
        "USEREMBED_BIN": str(USEREMBED_BIN),
        "PYTHON": sys.executable,
        "USEREMBED_GRPC_PORT": "0",
        "USEREMBED_METRICS_PORT": "-1",
    }
    return env | extra


def _run(
    script: Path, env: dict[str, str], timeout: float, *args: str
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of this test process counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_scripts_are_valid_bash() -> None:
    for script in (UP, DOWN):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert os.access(script, os.X_OK), f"{script.name} is not executable"


def test_down_without_up_does_nothing(tmp_path: Path) -> None:
    proc = _run(DOWN, _env(tmp_path / "home", "redis://127.0.0.1:1/0"), 30)
    assert proc.returncode == 0, proc.stderr
    assert "down: done" in proc.stdout


def test_up_refuses_an_unreachable_remote_redis_before_any_step(tmp_path: Path) -> None:
    home = tmp_path / "home"
    # TEST-NET-1 (RFC 5737): never answers, and is not local, so up.sh must not start one.
    proc = _run(UP, _env(home, "redis://192.0.2.1:6379/0"), 60)
    assert proc.returncode == 1
    assert "not local" in proc.stderr
    assert sorted(p.name for p in home.iterdir()) == ["native"]  # only its state folder


def test_down_stops_the_server_and_the_redis_that_up_started(tmp_path: Path) -> None:
    home = tmp_path / "home"
    state = home / "native"
    state.mkdir(parents=True)
    port = _free_port()
    argv = redis_server_argv(
        port, state, "--daemonize", "yes", "--pidfile", str(state / "redis.pid")
    )
    subprocess.run(argv, check=True, timeout=30)
    # A stand-in server, detached like up.sh's (its parent shell exits at once), so that this
    # test process does not keep it as a zombie.
    out = subprocess.run(
        ["bash", "-c", "(exec -a 'userembed serve' sleep 600) >/dev/null 2>&1 & echo $!"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    server_pid = int(out.stdout)
    (state / "server.pid").write_text(f"{server_pid}\n")
    for _ in range(50):
        if (state / "redis.pid").exists():
            break
        time.sleep(0.1)
    redis_pid = int((state / "redis.pid").read_text())
    try:
        proc = _run(DOWN, _env(home, f"redis://127.0.0.1:{port}/0"), 60)
        assert proc.returncode == 0, proc.stderr
        assert "SIGKILL" not in proc.stderr, "SIGTERM must be enough"
        for _ in range(50):
            if not _alive(redis_pid) and not _alive(server_pid):
                break
            time.sleep(0.1)
        assert not _alive(server_pid)
        assert not _alive(redis_pid)
        assert not (state / "server.pid").exists() and not (state / "redis.pid").exists()
    finally:
        for pid in (server_pid, redis_pid):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_down_leaves_a_recycled_pid_alone(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "native").mkdir(parents=True)
    other = subprocess.Popen(["sleep", "600"])  # not a `userembed serve`
    (home / "native" / "server.pid").write_text(f"{other.pid}\n")
    try:
        proc = _run(DOWN, _env(home, "redis://127.0.0.1:1/0"), 30)
        assert proc.returncode == 0, proc.stderr
        assert "no longer server" in proc.stderr
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_up_serves_an_embedding_then_down_leaves_nothing_running(tmp_path: Path) -> None:
    """The whole native path on a private Redis that up.sh starts itself, tiny sizes."""
    home = tmp_path / "home"
    env = _env(
        home,
        f"redis://127.0.0.1:{_free_port()}/0",
        USEREMBED_USERS="400",
        TRAIN_NPROC="1",
        TRAIN_MAX_STEPS="4",
        TRAIN_ARGS="--batch-size 32 --eval-every 4 --num-layers 1 --embedding-dim 8",
        EMBED_USER_ID="7",
    )
    state = home / "native"
    try:
        up = _run(UP, env, 840)
        assert up.returncode == 0, (up.stdout + up.stderr)[-4000:]
        assert "up: server SERVING on 127.0.0.1:" in up.stdout
        # `userembed embed` printed the vector of user 7 and where it came from.
        assert "user 7: " in up.stdout and "dim=" in up.stdout
        pids = [int((state / f).read_text()) for f in ("server.pid", "redis.pid")]
        assert all(_alive(p) for p in pids)
        port = int((state / "server.port").read_text())
        health = subprocess.run(
            [str(USEREMBED_BIN), "health", "--target", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert health.returncode == 0 and "SERVING" in health.stdout
    finally:
        down = _run(DOWN, env, 120)
    assert down.returncode == 0, down.stderr
    assert not any(_alive(p) for p in pids)
