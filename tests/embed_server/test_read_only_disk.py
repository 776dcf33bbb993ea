"""The server and the refresh need no writable disk (deploy/k8s: readOnlyRootFilesystem and a
read-only workspace, a /tmp emptyDir): run in a mount namespace where the whole file system
but a scratch /tmp is read-only, the server loads a model, reads real Feast, answers and hot-reloads; the refresh writes its vectors
to Redis only. Needs root (or CAP_SYS_ADMIN) for `unshare --mount`; skipped elsewhere."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from embed_server.client import EmbeddingClient
from tests.embed_server.conftest import MODEL, publish_tiny
from tests.embed_server.test_feast_integration import feast_store  # noqa: F401 (fixture)
from tests.embed_server.test_server import wait_for
from userembed.registry import Registry

UNSHARE = shutil.which("unshare")
# `/` bound onto itself read-only: every path the process could write to, the workspace
# included (/dev/shm and /proc are their own mounts, as in a pod), but a scratch tmpfs at
# $TMPDIR: the pods' /tmp emptyDir (Feast imports dill, which needs a usable temp folder).
# The probe proves the rest is read-only.
READ_ONLY = (
    "mount --bind / / && mount -o remount,bind,ro / "
    '&& mount -t tmpfs -o size=64m scratch "$TMPDIR" '
    '&& ! touch "$PROBE" 2>/dev/null && exec "$0" "$@"'
)


def _can_unshare() -> bool:
    if UNSHARE is None:
        return False
    argv = [UNSHARE, "--mount", "--propagation", "private", "sh", "-c", "mount --bind / /"]
    return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode == 0


pytestmark = pytest.mark.skipif(not _can_unshare(), reason="unshare --mount not permitted")


def _read_only(argv: list[str]) -> list[str]:
    assert UNSHARE is not None
    return [UNSHARE, "--mount", "--propagation", "private", "sh", "-c", READ_ONLY, *argv]


@pytest.mark.timeout(180)
def test_server_and_refresh_run_on_a_read_only_file_system(
    feast_store,  # noqa: F811
    registry: Registry,
    tmp_path: Path,
    redis_url: str,
) -> None:
    v1 = publish_tiny(registry, tmp_path / "staging", seed=1)
    exe = str(Path(sys.executable).parent / "userembed")
    # Feast, imported by this test process, pointed prometheus_client at a folder of its own
    # under /tmp: a fresh process makes its own in $TMPDIR.
    env = {
        **{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
        "USEREMBED_REGISTRY_ROOT": registry.root,
        "REDIS_URL": redis_url,
        "USEREMBED_DRAIN_GRACE_S": "1",
        "USEREMBED_RELOAD_INTERVAL_S": "0.2",
        "PROBE": str(tmp_path / "probe"),
        "TMPDIR": str(tmp_path / "scratch"),
    }
    (tmp_path / "scratch").mkdir()
    log = (tmp_path / "serve.log").open("w")  # opened before the namespace makes it read-only
    proc = subprocess.Popen(
        _read_only([exe, "serve", "--port", "0", "--metrics-port", "-1"]),
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )

    try:
        line = proc.stdout.readline() if proc.stdout else ""
        m = re.match(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert m, (line, (tmp_path / "serve.log").read_text()[-2000:])
        with EmbeddingClient(f"127.0.0.1:{m.group(1)}", timeout_s=30) as c:
            first = c.get("11")
            assert (first.source, first.model_version) == ("computed", v1)
            v2 = publish_tiny(registry, tmp_path / "staging", seed=2)
            wait_for(lambda: c.list_models().models[0].version == v2, "the hot reload")
            refresh = subprocess.run(
                _read_only([exe, "refresh", "--model", MODEL]),
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert refresh.returncode == 0, refresh.stderr[-2000:]
            assert c.get("12").source == "stored"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert not (tmp_path / "probe").exists()
    assert "Read-only file system" not in (tmp_path / "serve.log").read_text()
