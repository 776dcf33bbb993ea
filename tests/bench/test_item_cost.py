"""The item attribute cost benchmark (bench/item_cost.py): a tiny run through the real path
(MovieLens build with items, two trainings, exports, refreshes, two servers), its tiling of
the offline files and its figures."""

from __future__ import annotations

import math
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench import item_cost_models, item_cost_report
from tests.output import last_json
from userembed.paths import BEHAVIOR_FILE, PROFILE_FILE

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_run_measures_both_models_which_differ_only_by_the_items_table() -> None:
    md = ROOT / "BENCHMARKS.md"
    before = md.read_text()
    proc = subprocess.run(
        [sys.executable, "bench/item_cost.py", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = last_json(proc.stdout)

    with_items, without = report["models"]["with_items"], report["models"]["without_items"]
    assert with_items["item_attributes"] == ["categories", "release_year_bucket"]
    assert with_items["attribute_buckets"] > 0
    assert "lt_attribute_counts" in with_items["inputs"]
    assert without["item_attributes"] == [] and without["attribute_buckets"] == 0
    assert "lt_attribute_counts" not in without["inputs"]
    assert set(without["inputs"]) < set(with_items["inputs"])

    assert report["users"] == 2 * 943  # --quick: MovieLens' users twice
    assert report["miss_errors"] == {}
    assert set(report["figures"]) == {key for key, _ in item_cost_report.ROWS}
    for key, f in report["figures"].items():
        for side in item_cost_models.SIDES:
            assert f[side] > 0 and f["cpu_us_per_user"][side] > 0, key
            assert len(f["runs"][side]) == report["config"]["rounds"], key
        assert math.isfinite(f["ratio"]) and f["ratio"] > 0, key
        assert math.isfinite(f["cpu_ratio"]) and f["cpu_ratio"] > 0, key
    assert md.read_text() == before  # --quick never edits the doc


def test_tiling_keeps_each_users_latest_row_and_numbers_the_copies(tmp_path: Path) -> None:
    ts = [datetime(2026, 1, d, tzinfo=UTC) for d in (1, 5, 3)]
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array([7, 7, 3], pa.int64()),
                "event_timestamp": pa.array(ts, pa.timestamp("us", tz="UTC")),
                "item_seq": pa.array([[1], [1, 2], [9]], pa.list_(pa.int64())),
            }
        ),
        tmp_path / BEHAVIOR_FILE,
    )
    pq.write_table(
        pa.table({"user_id": [3, 7, 8], "event_timestamp": ts, "gender": [0, 1, 2]}),
        tmp_path / PROFILE_FILE,
    )
    assert item_cost_models.tile_offline(tmp_path, 3) == 6
    behavior = pq.read_table(tmp_path / BEHAVIOR_FILE).to_pydict()
    assert sorted(behavior["user_id"]) == [0, 1, 2, 3, 4, 5]
    rows = dict(zip(behavior["user_id"], behavior["item_seq"], strict=True))
    assert rows[0] == rows[2] == rows[4] == [9]  # user 3, then user 7's latest row
    assert rows[1] == rows[3] == rows[5] == [1, 2]
    profile = pq.read_table(tmp_path / PROFILE_FILE).to_pydict()
    genders = dict(zip(profile["user_id"], profile["gender"], strict=True))
    assert genders == {0: 0, 1: 1, 2: 0, 3: 1, 4: 0, 5: 1}  # user 8 has no behaviour: left out


def test_figure_takes_medians_per_side_and_ratios_with_over_without() -> None:
    runs = {
        "with_items": [(100.0, 10.0), (300.0, 30.0), (200.0, 20.0)],
        "without_items": [(400.0, 5.0), (500.0, 4.0), (300.0, 6.0)],
    }
    f = item_cost_report.figure(runs)
    assert (f["with_items"], f["without_items"]) == (200.0, 400.0)
    assert f["ratio"] == 0.5
    assert f["cpu_us_per_user"] == {"with_items": 20.0, "without_items": 5.0}
    assert f["cpu_ratio"] == 0.25  # users per CPU second: with makes a quarter of without
    assert np.array(f["runs"]["with_items"]).shape == (3, 2)
