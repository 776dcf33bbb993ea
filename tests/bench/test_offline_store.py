"""A tiny run of bench/offline_store.py: every path builds the same frame from the same files,
and materialize writes every user online (no assertion on speed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.output import last_json

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_offline_store_bench_paths_agree_and_materialize_writes_every_user(
    tmp_path: Path,
) -> None:
    argv = ["bench/offline_store.py", "--sizes", "400", "--materialize-users", "150"]
    argv += ["--dask-max-users", "0", "--timeout-s", "300", "--workdir", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = last_json(proc.stdout)
    size = out["frames"]["400"]
    for path in ("duckdb", "dask", "merge_asof"):
        assert size[path]["rows"] == size["label_rows"] == 400, path
        assert size[path]["peak_rss_gib"] > 0
    assert size["frames_equal"]
    mat = out["materialize"]
    assert mat["duckdb"]["online_rows"] == 150  # one Redis hash per user
    assert "skipped" in mat["dask"]
