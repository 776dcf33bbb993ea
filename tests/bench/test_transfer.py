"""The transfer benchmark (bench/transfer.py): a tiny run through the whole real path, and
the pieces its figures rest on: the probe and its folds, the paired differences, the hand-made
profile, and a MovieLens input that never holds the future window."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import transfer_append, transfer_report
from bench import transfer_probe as probe
from bench.transfer_data import (
    ProbeData,
    hand_profile,
    load_probe_inputs,
    movielens_team_files,
    save_probe_inputs,
    vectors_path,
)
from tests.output import last_json

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_run_probes_vectors_read_back_from_redis_beside_the_profile(tmp_path: Path) -> None:
    """Synthetic, 300 users, SUPERMOE and MMoE: data build, Feast, TorchRec training, ONNX
    export, refresh into a real Redis, vectors read back, probes; the report is complete."""
    md = ROOT / "BENCHMARKS.md"
    before = md.read_text()
    proc = subprocess.run(
        [sys.executable, "bench/transfer.py", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    head = last_json(proc.stdout)
    assert set(head["mean_auc"]) == {"profile", "supermoe", "mmoe"}
    assert all(0.0 <= a <= 1.0 for a in head["mean_auc"].values())
    assert set(head["delta_vs_profile"]) == {"supermoe", "mmoe"}
    assert set(head["supermoe_minus"]) == {"mmoe"}
    assert head["train_cpu_min"]["supermoe"] > 0

    report = json.loads((tmp_path / "transfer_synthetic.json").read_text())
    tasks = set(report["definitions"])
    assert {"activity", "engagement", "buyer", "exploration", "gender"} <= tasks
    assert report["probe_users"] == 300
    by_model = {(r["model"], r["seed"]): r for r in report["records"]}
    assert set(by_model) == {("profile", 0), ("supermoe", 0), ("mmoe", 0)}
    for rec in report["records"]:
        assert set(rec["probe_auc"]) == tasks
        assert all(0.0 <= a <= 1.0 for a in rec["probe_auc"].values()), rec
    for model in ("supermoe", "mmoe"):
        rec = by_model[model, 0]
        assert set(rec["labelled_auc"]) == {"click", "purchase", "churn", "explore"}
        assert rec["vector_dim"] == 16  # --quick's user_dim: the exported model's vectors
    assert (tmp_path / "transfer_synthetic.png").stat().st_size > 0
    section = transfer_report.markdown(report)
    assert section.startswith(transfer_report.begin_marker("synthetic"))
    assert "hand-made profile" in section and "Bayes-optimal" in section
    assert "over users" in section
    se_users = report["summary"]["vs_profile"]["supermoe"]["mean"]["se_users"]
    assert se_users > 0
    # --from-json renders the saved report again: the SE over users needs the runs, so it stays
    from bench import transfer

    assert transfer.main(["--from-json", str(tmp_path / "transfer_synthetic.json")]) == 0
    again = json.loads((tmp_path / "transfer_synthetic.json").read_text())
    assert again["summary"]["vs_profile"]["supermoe"]["mean"]["se_users"] == se_users
    assert md.read_text() == before  # --quick never edits the doc


def test_probe_finds_a_feature_that_sets_the_label_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    n = 600
    y = (rng.random(n) < 0.3).astype(np.float64)
    planted = rng.normal(size=(n, 8))
    planted[:, 0] += 4.0 * y
    noise = rng.normal(size=(n, 8))
    fold = probe.stratified_folds(y, seed=0)
    assert probe.probe_auc(planted, y, fold) > 0.95
    assert abs(probe.probe_auc(noise, y, fold) - 0.5) < 0.07


def test_folds_are_stratified_fixed_by_seed_and_leave_unlabelled_users_out() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(500) < 0.2).astype(np.float64)
    y[:100] = np.nan  # e.g. a future-window task of users inactive in the window
    fold = probe.stratified_folds(y, seed=3)
    assert np.all(fold[:100] == -1) and np.all(fold[100:] >= 0)
    assert np.array_equal(fold, probe.stratified_folds(y, seed=3))
    assert not np.array_equal(fold, probe.stratified_folds(y, seed=4))
    positives = [int(np.sum(y[fold == f])) for f in range(probe.FOLDS)]
    assert max(positives) - min(positives) <= 1
    few = np.r_[np.ones(3), np.zeros(100)]  # fewer positives than folds: task skipped
    assert np.all(probe.stratified_folds(few, seed=0) == -1)
    assert np.isnan(probe.probe_auc(rng.normal(size=(103, 2)), few, np.full(103, -1)))


def test_weighted_auc_is_roc_auc_under_each_weighting_ties_included() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    y = (rng.random(300) < 0.4).astype(np.float64)
    scores = rng.integers(0, 6, 300).astype(np.float64) + y  # many ties
    weights = np.vstack([np.ones(300), rng.poisson(1.0, 300)])
    got = probe.weighted_auc(scores, y, weights)
    assert got[0] == pytest.approx(roc_auc_score(y, scores))
    assert got[1] == pytest.approx(roc_auc_score(y, scores, sample_weight=weights[1]))
    assert np.isnan(probe.weighted_auc(scores, np.zeros(300), weights)).all()  # one class


def _two_scorers(n: int, rng: np.random.Generator) -> tuple[ProbeData, np.ndarray, np.ndarray]:
    """n users, one task, and two out-of-fold scorings of it, one sharper than the other."""
    y = (rng.random(n) < 0.5).astype(np.float64)
    signal = rng.normal(size=n) + 0.8 * y
    data = ProbeData(np.arange(n), {"t": y}, {"t": "planted"}, np.zeros((n, 1)), ("c",))
    return data, signal + 0.5 * rng.normal(size=n), signal + rng.normal(size=n)


def test_the_standard_error_over_users_is_the_spread_over_fresh_users() -> None:
    # What the bootstrap estimates from one sample of users: how far the paired AUC
    # difference moves when another sample of the same size is drawn.
    rng = np.random.default_rng(3)

    def difference_and_se(n: int) -> tuple[float, float]:
        data, a, b = _two_scorers(n, rng)
        folds = {0: {"t": probe.stratified_folds(data.targets["t"], seed=0)}}
        y, fold = data.targets["t"], folds[0]["t"]
        diff = probe.fold_auc(a, y, fold) - probe.fold_auc(b, y, fold)
        se = probe.user_bootstrap_se({0: {"t": a}}, {0: {"t": b}}, data, folds, replicates=300)
        assert se["mean"] == pytest.approx(se["t"])  # one task: its mean is itself
        return diff, se["t"]

    fresh = [difference_and_se(150) for _ in range(200)]
    spread = float(np.std([d for d, _ in fresh], ddof=1))
    estimate = float(np.mean([se for _, se in fresh]))
    assert 0.75 * spread < estimate < 1.33 * spread, (spread, estimate)
    larger = float(np.mean([difference_and_se(600)[1] for _ in range(20)]))
    assert 0.35 < larger / estimate < 0.65  # four times the users: about half the error
    data, a, _ = _two_scorers(150, rng)
    folds = {0: {"t": probe.stratified_folds(data.targets["t"], seed=0)}}
    assert probe.user_bootstrap_se({0: {"t": a}}, {0: {"t": a}}, data, folds)["t"] == 0.0


def test_differences_to_the_profile_and_between_models_are_paired_by_seed() -> None:
    # Seed 1's folds are easier for every representation: pairing takes that swing out.
    profile = {0: 0.70, 1: 0.80, 2: 0.75}
    vector = {0: 0.72, 1: 0.81, 2: 0.78}
    mmoe = {0: 0.69, 1: 0.80, 2: 0.74}
    records = []
    for s in range(3):
        records.append({"model": "profile", "seed": s, "probe_auc": {"a": profile[s], "b": 0.6}})
        for name, auc in (("supermoe", vector[s]), ("mmoe", mmoe[s])):
            records.append(
                {
                    "model": name,
                    "seed": s,
                    "probe_auc": {"a": auc, "b": 0.55},
                    "labelled_auc": {"t": 0.7},
                    "train_cpu_seconds": 60.0,
                    "steps": 10,
                }
            )
    s = transfer_report.summarise(records, ("profile", "supermoe", "mmoe"), ["a", "b"], ["t"])
    d = s["vs_profile"]["supermoe"]["a"]
    diffs = [0.02, 0.01, 0.03]
    assert d["mean"] == pytest.approx(np.mean(diffs))
    assert d["se"] == pytest.approx(np.std(diffs, ddof=1) / np.sqrt(3))
    assert s["vs_profile"]["supermoe"]["worst_task"] == {"task": "b", "delta": pytest.approx(-0.05)}
    assert s["vs_profile"]["supermoe"]["tasks_behind"] == ["b"]
    assert s["supermoe_minus"]["mmoe"]["probe"]["a"]["mean"] == pytest.approx(
        np.mean([0.03, 0.01, 0.04])
    )
    mean = s["vs_profile"]["mmoe"]["mean"]  # per seed over tasks, then over seeds
    assert mean["mean"] == pytest.approx(np.mean([(-0.01 - 0.05) / 2, -0.025, -0.03]))
    assert s["labelled"]["mmoe"]["train_cpu_min"] == pytest.approx(1.0)


def test_hand_profile_summarises_the_whole_history_before_the_cut_only() -> None:
    at = pd.Timestamp("2026-01-31", tz="UTC")
    ts = pd.to_datetime(
        ["2026-01-01", "2026-01-10", "2026-01-30", "2026-01-31", "2026-01-20"], utc=True
    )
    events = pd.DataFrame(
        {
            "user_id": [7, 7, 7, 7, 9],
            "item_id": [1, 1, 2, 3, 4],
            "category_id": [0, 1, 1, 2, 0],
            "event_type": [1, 3, 5, 5, 2],
            "event_timestamp": ts,
        }
    )
    x, names = hand_profile(events, np.array([7, 9, 11]), at)
    row = dict(zip(names, x[0], strict=True))
    # the event at `at` itself is not history: category 2 and the fourth event never count
    assert "category_2" not in names
    assert (row["category_0"], row["category_1"]) == pytest.approx((1 / 3, 2 / 3))
    assert row["event_type_mean"] == pytest.approx(3.0)
    assert row["log_count"] == pytest.approx(np.log1p(3))
    assert row["log_count_7d"] == pytest.approx(np.log1p(1))
    assert row["log_distinct_items"] == pytest.approx(np.log1p(2))
    assert row["log_recency_days"] == pytest.approx(np.log1p(1.0))
    assert row["log_tenure_days"] == pytest.approx(np.log1p(30.0))
    assert np.all(x[2] == 0.0)  # a user without history: zeros


def test_movielens_input_never_holds_the_future_window(tmp_path: Path) -> None:
    files, data = movielens_team_files(tmp_path)
    events = pd.read_parquet(files.events)
    users = pd.read_parquet(files.users)
    labels = pd.read_parquet(files.labels)
    assert events["event_timestamp"].max() < files.window_start
    # every label window [cut, cut + 3 weeks) ends by the window start
    assert labels["label_timestamp"].max() + pd.Timedelta(weeks=3) <= files.window_start
    assert {c for c in labels if c.startswith("label_") and c != "label_timestamp"} == {
        "label_active",
        "label_rate_high",
        "label_new_genre",
    }
    assert set(users.columns) == {"user_id", "region"} and users["region"].nunique() == 1
    assert np.array_equal(data.user_ids, np.sort(events["user_id"].unique()))
    assert {"gender", "age_35_plus", "occ_student", "future_active", "future_drama"} <= set(
        data.targets
    )
    assert data.profile.shape == (len(data.user_ids), len(data.profile_columns))
    active = data.targets["future_active"] == 1.0
    # window tasks other than activity are defined exactly for the users active in it
    assert np.array_equal(~np.isnan(data.targets["future_rating_level"]), active)


def test_each_source_has_its_own_section_replaced_on_rerun(tmp_path: Path) -> None:
    from bench.common import write_section

    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nhand-written verdict\n")
    for run in ("first", "second"):
        for source in transfer_report.SOURCES:
            begin, end = transfer_report.begin_marker(source), transfer_report.end_marker(source)
            write_section(f"{begin}\n{source} {run}\n{end}", begin, end, doc)
    text = doc.read_text()
    assert "hand-written verdict" in text and "first" not in text
    assert "movielens second" in text and "synthetic second" in text


def test_appending_the_column_a_vector_blurs_closes_its_gap_to_the_profile(tmp_path: Path) -> None:
    """bench/transfer_append.py on inputs saved as bench/transfer.py --save-vectors saves them:
    a task set by one profile column, a vector that holds it weakly."""
    rng = np.random.default_rng(0)
    n = 400
    y = (rng.random(n) < 0.4).astype(np.float64)
    columns = ("category_0", "log_count", "region_1")
    profile = np.c_[rng.normal(size=n), 2.0 * y + rng.normal(size=n), rng.normal(size=n)]
    data = ProbeData(np.arange(n), {"active": y}, {"active": "x"}, profile, columns)
    save_probe_inputs(tmp_path, data)
    for seed in range(2):
        vec = rng.normal(size=(n, 8))
        vec[:, 0] += 0.5 * y
        np.save(vectors_path(tmp_path, "supermoe", seed), vec)
    back = load_probe_inputs(tmp_path)
    assert back.profile_columns == columns and np.array_equal(back.targets["active"], y)
    assert transfer_append.columns_of(back, "counts") == [1]
    assert transfer_append.columns_of(back, "categories") == [0]
    assert transfer_append.columns_of(back, "attributes") == [2]
    assert transfer_append.columns_of(back, "profile,log_count") == [0, 1, 2]

    result = transfer_append.run(tmp_path, "supermoe", 2, {"count": "log_count"})
    alone = result["summary"]["supermoe"]["delta_vs_profile"]["mean"]
    appended = result["summary"]["supermoe+count"]["delta_vs_profile"]["mean"]
    assert alone < -0.1 and abs(appended) < 0.02
    users = result["summary"]["supermoe"]["delta_vs_profile"]["se_users"]
    assert 0.0 < users < 0.1 and result["summary"]["supermoe"]["per_task_se_users"]["active"] > 0
