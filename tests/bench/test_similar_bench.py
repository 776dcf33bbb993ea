"""A tiny run of bench/similar.py exactly as documented (a child process per size), so it cannot
rot; no assertion on speed, only that every figure and its brute-force reference were measured
and the HNSW answer is close to the exact one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.output import last_json

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_similar_bench_reports_recall_and_speed_beside_brute_force() -> None:
    argv = ["bench/similar.py", "--users", "1000", "--ef-search-sweep", "16", "--seconds", "0.2"]
    proc = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = last_json(proc.stdout)["results"]
    assert result["users"] == 1000 and result["brute_qps_one"] > 0 < result["brute_qps_batched"]
    assert result["build_s"] >= 0 and result["index_mb"] > 0 and result["peak_rss_mb"] > 0
    rows = {r["ef_search"]: r for r in result["by_ef_search"]}
    assert sorted(rows) == [16, result["ef_search"]]
    assert rows[result["ef_search"]]["recall_at_10"] >= 0.9  # ~0 if ids and vectors were misaligned
    assert all(r["qps_one"] > 0 and r["x_brute_one"] > 0 for r in rows.values())
