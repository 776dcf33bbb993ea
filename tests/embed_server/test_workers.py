"""Several worker processes on one port (embed_server/workers.py): metrics summed over workers,
a model reload seen by every worker, a killed worker restarted with health NOT_SERVING until it
is back, SIGTERM draining every worker, a port held by another process refused."""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from embed_server.client import EmbeddingClient
from embed_server.settings import ServerSettings, load_settings
from embed_server.workers import PortInUseError, WorkerPool, reserve_port
from tests.conftest import RedisServer
from tests.embed_server.conftest import FakeFeatures, LoopThread, publish_tiny
from tests.waiting import wait_for
from userembed.processes import LISTENING, listening_address
from userembed.registry import Registry

REPO = Path(__file__).resolve().parents[2]


def fake_features(settings: ServerSettings) -> FakeFeatures:
    """Each worker's feature source (spawned workers import this module by name)."""
    f = FakeFeatures()
    for uid in range(1, 21):
        f.add(str(uid), items=[uid, uid + 1, uid + 2])
    return f


def health(port: int) -> str:
    """The health status one new connection (so: any worker) reports; a connection that a
    dying worker had accepted is reset ("UNREACHABLE")."""
    try:
        with EmbeddingClient(f"127.0.0.1:{port}", timeout_s=5.0) as c:
            return c.health("")
    except grpc.RpcError:
        return "UNREACHABLE"


def metric(port: int, line_start: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    return sum(float(x.rsplit(" ", 1)[1]) for x in body.splitlines() if x.startswith(line_start))


@pytest.fixture
def v1(registry: Registry, tmp_path: Path) -> str:
    return publish_tiny(registry, tmp_path / "staging", seed=1)


@pytest.fixture(scope="module")
def pool(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerPool]:
    """Two workers, shared by the tests of this module (spawning them is most of the cost)."""
    root = tmp_path_factory.mktemp("workers")
    registry = Registry(root / "models")
    publish_tiny(registry, root / "staging", seed=1)
    settings = load_settings(
        env={},
        grpc_port=0,
        metrics_port=0,
        registry_root=registry.root,
        redis_url=redis_server.url,
        reload_interval_s=0.2,
        batch_wait_ms=1.0,
        drain_grace_s=1.0,
        workers=2,
    )
    loop = LoopThread()
    p = WorkerPool(settings, features_factory=fake_features)
    loop.run(p.start(), timeout=120)
    stop = loop.run(_event())
    import asyncio

    supervising = asyncio.run_coroutine_threadsafe(p.supervise(stop), loop.loop)
    try:
        yield p
    finally:
        loop.loop.call_soon_threadsafe(stop.set)
        supervising.result(10)
        loop.run(p.stop(), timeout=60)
        loop.close()


async def _event() -> Any:
    import asyncio

    return asyncio.Event()


def per_worker_requests(metrics_dir: str) -> dict[str, float]:
    """userembed_requests_total per worker file (counter_<pid>.db)."""
    from prometheus_client.mmap_dict import MmapedDict

    out = {}
    for path in glob.glob(os.path.join(metrics_dir, "counter_*.db")):
        values = MmapedDict.read_all_values_from_file(path)
        out[path] = sum(v for key, v, _ts, _pos in values if '"userembed_requests"' in key)
    return out


def test_metrics_are_summed_over_workers_and_each_worker_reloads(pool, tmp_path):
    wait_for(lambda: health(pool.port) == "SERVING", "every worker serving")
    assert pool.metrics_port is not None
    ok = 'userembed_requests_total{code="OK",method="GetUserEmbedding"}'
    ok_before = metric(pool.metrics_port, ok)
    files_before = per_worker_requests(pool.metrics_dir)
    calls = 0
    for _ in range(24):  # each client is a new connection: the kernel spreads them
        with EmbeddingClient(f"127.0.0.1:{pool.port}") as c:
            c.get("1")
            c.get("2")
            calls += 2
    per_worker = per_worker_requests(pool.metrics_dir)
    served = [f for f, n in per_worker.items() if n > files_before.get(f, 0)]
    assert len(served) == 2  # both workers served calls
    assert metric(pool.metrics_port, ok) - ok_before == calls  # the sum, from the parent
    # a new registry version: every worker polls and loads it
    loaded = 'userembed_model_reloads_total{model="tiny",outcome="loaded"}'
    loaded_before = metric(pool.metrics_port, loaded)
    v2 = publish_tiny(Registry(pool.settings.registry_root), tmp_path / "staging", seed=2)
    wait_for(
        lambda: metric(pool.metrics_port, loaded) == loaded_before + 2, "v2 loaded by 2 workers"
    )
    for _ in range(8):
        with EmbeddingClient(f"127.0.0.1:{pool.port}") as c:
            assert c.get("3").model_version == v2


def test_killed_worker_is_restarted_and_health_waits_for_it(pool):
    wait_for(lambda: health(pool.port) == "SERVING", "every worker serving")
    old = pool.pids
    assert None not in old and len(set(old)) == 2
    os.kill(old[0], signal.SIGKILL)
    # the other worker answers every new connection now: NOT_SERVING until all are back
    wait_for(lambda: health(pool.port) == "NOT_SERVING", "NOT_SERVING while one is down")
    wait_for(lambda: pool.pids[0] not in (None, old[0]), "worker 0 restarted")
    assert pool.pids[1] == old[1]
    wait_for(lambda: health(pool.port) == "SERVING", "SERVING once the restarted one is")
    with EmbeddingClient(f"127.0.0.1:{pool.port}") as c:
        assert c.get("4").source in ("stored", "computed")


def test_sigterm_to_the_parent_drains_every_worker(settings_for, v1, redis_url):
    s = settings_for(workers=2, drain_grace_s=2.0)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "USEREMBED_REGISTRY_ROOT": s.registry_root,
        "USEREMBED_REDIS_URL": redis_url,
        "USEREMBED_GRPC_PORT": "0",
        "USEREMBED_METRICS_PORT": "-1",
        "USEREMBED_WORKERS": "2",
        "USEREMBED_DRAIN_GRACE_S": "2",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.embed_server.test_workers"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(LISTENING):
                break
        else:
            raise AssertionError("no listening line:\n" + "".join(lines))
        port = int(listening_address(line).rsplit(":", 1)[1])
        pids = [int(p) for p in line.split("pids ")[1].split(",")]
        wait_for(lambda: health(port) == "SERVING", "every worker serving")
        proc.send_signal(signal.SIGTERM)
        out = "".join(lines) + proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    for slot in (0, 1):
        assert f"worker-{slot} INFO embed_server.server: draining" in out, out
        assert f"worker-{slot} INFO embed_server.server: stopped" in out, out
    assert "all workers stopped" in out
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_port_held_by_another_process_is_refused():
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen()
    try:
        with pytest.raises(PortInUseError, match="in use"):
            reserve_port("127.0.0.1", other.getsockname()[1])
    finally:
        other.close()
    # port 0: a free port, reserved for this server's workers alone
    s = reserve_port("127.0.0.1", 0)
    assert s.getsockname()[1] > 0
    s.close()


def _main() -> None:
    """The parent process of the SIGTERM test: workers with the fake features."""
    import logging

    from embed_server.event_loop import run
    from embed_server.workers import serve_workers

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def started(p: WorkerPool) -> None:
        pids = ",".join(str(pid) for pid in p.pids)
        print(f"{LISTENING} 127.0.0.1:{p.port}, pids {pids}", flush=True)

    run(serve_workers(load_settings(), started, fake_features), "auto")


if __name__ == "__main__":
    _main()
