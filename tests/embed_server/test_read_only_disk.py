"""The server and the refresh need no writable disk beyond their volumes (deploy/k8s:
readOnlyRootFilesystem, a read-only workspace, a /tmp emptyDir, and the similar-users volume
that only the refresh writes): run in mount namespaces where the whole file system but a scratch
/tmp is read-only, the server loads a model, reads real Feast, answers and hot-reloads; the
refresh, with the similar root writable as its pod has it, writes its vectors to Redis and its
index to the similar root only, and the server loads that index read-only. Needs root (or
CAP_SYS_ADMIN) for `unshare --mount`; skipped elsewhere."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from embed_server.client import EmbeddingClient
from tests.embed_server.conftest import MODEL, publish_tiny
from tests.embed_server.test_feast_integration import feast_store  # noqa: F401 (fixture)
from tests.waiting import wait_for
from userembed.registry import Registry
from userembed.similar_index import IndexStore

UNSHARE = shutil.which("unshare")
# `/` bound onto itself read-only: every path the process could write to, the workspace
# included (/dev/shm and /proc are their own mounts, as in a pod), but a scratch tmpfs at
# $TMPDIR: the pods' /tmp emptyDir (Feast imports dill, which needs a usable temp folder).
# A folder bound onto itself before the remount stays writable: the refresh's similar volume.
# The probe proves the rest is read-only.
READ_ONLY = (
    "mount --bind / / && {writable}mount -o remount,bind,ro / "
    '&& mount -t tmpfs -o size=64m scratch "$TMPDIR" '
    '&& ! touch "$PROBE" 2>/dev/null && exec "$0" "$@"'
)
PROMETHEUS_DIRS = {"PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR"}


def _can_unshare() -> bool:
    if UNSHARE is None:
        return False
    argv = [UNSHARE, "--mount", "--propagation", "private", "sh", "-c", "mount --bind / /"]
    return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode == 0


pytestmark = pytest.mark.skipif(not _can_unshare(), reason="unshare --mount not permitted")


def _read_only(argv: list[str], writable: Path | None = None) -> list[str]:
    assert UNSHARE is not None
    bind = f"mount --bind {shlex.quote(str(writable))} {shlex.quote(str(writable))} && "
    script = READ_ONLY.format(writable=bind if writable else "")
    return [UNSHARE, "--mount", "--propagation", "private", "sh", "-c", script, *argv]


def _index_loaded(c: EmbeddingClient) -> bool:
    try:
        c.similar("12", k=3)
    except grpc.RpcError as e:  # FAILED_PRECONDITION until the new version's index is loaded
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e.details()
        return False
    return True


@pytest.mark.timeout(180)
def test_server_and_refresh_run_on_a_read_only_file_system(
    feast_store,  # noqa: F811
    registry: Registry,
    tmp_path: Path,
    redis_url: str,
) -> None:
    v1 = publish_tiny(registry, tmp_path / "staging", seed=1)
    similar_root = tmp_path / "similar"
    exe = str(Path(sys.executable).parent / "userembed")
    # Feast, imported by this test process, pointed prometheus_client at a folder of its own
    # under /tmp (both variable names): a fresh process makes its own in $TMPDIR.
    env = {
        **{k: v for k, v in os.environ.items() if k not in PROMETHEUS_DIRS},
        "USEREMBED_REGISTRY_ROOT": registry.root,
        "REDIS_URL": redis_url,
        "USEREMBED_DRAIN_GRACE_S": "1",
        "USEREMBED_RELOAD_INTERVAL_S": "0.2",
        "PROBE": str(tmp_path / "probe"),
        "TMPDIR": str(tmp_path / "scratch"),
        # Read-only for the server; the refresh's namespace binds it writable.
        "USEREMBED_SIMILAR_ROOT": str(similar_root),
    }
    (tmp_path / "scratch").mkdir()
    similar_root.mkdir()
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
                _read_only([exe, "refresh", "--model", MODEL], writable=similar_root),
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert refresh.returncode == 0, refresh.stderr[-2000:]
            assert c.get("12").source == "stored"
            # The index the refresh wrote, loaded by the server from its read-only similar root.
            wait_for(lambda: _index_loaded(c), "the server loading the refresh's index")
            near = c.similar("12", k=3)
            assert near.user_ids and IndexStore(similar_root).exists(MODEL, near.embedding_version)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert not (tmp_path / "probe").exists()
    assert "Read-only file system" not in (tmp_path / "serve.log").read_text()
