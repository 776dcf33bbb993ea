"""Tiny runs of the benchmark commands, so they cannot rot (part of the suite and of CI):

    .venv/bin/pytest tests/bench -q

Each command runs as a subprocess exactly as documented and must end with one JSON line.
No assertion is on speed: only that every figure and its reference were measured.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from tests.output import last_json

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _bench_module(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def _run(args: list[str], timeout: int) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return last_json(proc.stdout)


def test_quality_smoke_reports_every_model_with_seesaw_and_probes(tmp_path: Path) -> None:
    md = ROOT / "BENCHMARKS.md"
    before = md.read_text() if md.exists() else None
    out = _run(
        ["bench/quality.py", "--smoke", "--dataset", "synthetic", "--out", str(tmp_path)], 600
    )
    quality_report = _bench_module("quality_report")
    models = out["synthetic"]
    assert set(models) == {"single_task", *quality_report.MULTI_TASK_MODELS}
    for name in quality_report.MULTI_TASK_MODELS:
        assert 0.0 <= models[name]["avg_auc"] <= 1.0
        assert 0 <= models[name]["seesaw"] <= 4  # four synthetic tasks
        assert set(models[name]["probe"]) == {"gender", "occupation"}
    report = json.loads((tmp_path / "quality_smoke.json").read_text())
    assert report["datasets"][0]["bayes_auc"].keys() == {"click", "purchase", "churn", "explore"}
    assert (tmp_path / "quality_smoke.png").stat().st_size > 0
    assert (md.read_text() if md.exists() else None) == before  # smoke never edits the doc


def test_a_generated_section_is_replaced_on_rerun_and_the_rest_kept(tmp_path: Path) -> None:
    from bench.common import write_section

    quality, perf = _bench_module("quality_report"), _bench_module("perf")
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nhand-written intro\n")
    for run in ("first", "second"):
        write_section(
            f"{quality.BEGIN}\nquality {run}\n{quality.END}", quality.BEGIN, quality.END, doc
        )
        write_section(f"{perf.BEGIN}\nperf {run}\n{perf.END}", perf.BEGIN, perf.END, doc)
    text = doc.read_text()
    assert "hand-written intro" in text and "first" not in text
    assert text.index("quality second") < text.index("perf second")
    assert text.count(quality.END) == 1 and text.count(perf.END) == 1


def test_probe_finds_an_attribute_written_into_the_vectors_and_not_a_random_one() -> None:
    quality = _bench_module("quality_probes")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 2000)
    x = rng.normal(size=(2000, 8))
    x[:, 0] += 2.0 * (y == 1)
    x[:, 1] += 2.0 * (y == 2)
    fit = np.arange(2000) % 2 == 0
    assert quality.probe_auc(x, y, fit) > 0.85
    assert abs(quality.probe_auc(x, rng.integers(0, 2, 2000), fit) - 0.5) < 0.06


def test_seesaw_counts_tasks_below_single_task_by_more_than_the_margin() -> None:
    quality = _bench_module("quality_report")
    single = [
        {"model": f"single:{t}", "seed": 0, "test_auc": {t: 0.8}, "seconds": 1, "steps": 1}
        for t in ("a", "b", "c")
    ]
    multi = {"model": "mmoe", "seed": 0, "seconds": 1, "steps": 1, "probe_auc": {}}
    multi["test_auc"] = {"a": 0.81, "b": 0.796, "c": 0.79}  # c is 0.01 below, b only 0.004
    summary = quality.summarise([*single, multi], ("a", "b", "c"), [])
    assert summary["mmoe"]["seesaw"] == {"count": 1, "tasks": ["c"]}


def test_difference_to_single_task_is_paired_by_seed() -> None:
    quality = _bench_module("quality_report")
    # Seed 1 is better for every model: unpaired, the 0.05 spread would swamp the gain.
    single = [
        {"model": "single:a", "seed": s, "test_auc": {"a": auc}, "seconds": 1, "steps": 1}
        for s, auc in ((0, 0.70), (1, 0.80), (2, 0.75))
    ]
    multi = [
        {"model": "mmoe", "seed": s, "test_auc": {"a": auc}, "seconds": 1, "steps": 1,
         "probe_auc": {}}
        for s, auc in ((0, 0.71), (1, 0.81), (2, 0.762))
    ]  # fmt: skip
    paired = quality.summarise([*single, *multi], ("a",), [])["mmoe"]["vs_single"]["a"]
    assert paired["n"] == 3
    assert paired["mean"] == pytest.approx((0.01 + 0.01 + 0.012) / 3)
    assert paired["se"] == pytest.approx(np.std([0.01, 0.01, 0.012], ddof=1) / np.sqrt(3))


def test_a_kept_teacher_is_reused_only_for_the_same_budget(tmp_path: Path) -> None:
    """--workdir keeps single-task runs; a later invocation reuses one as the distilled
    model's teacher only when its saved config is the one it would train now."""
    quality, quality_data = _bench_module("quality"), _bench_module("quality_data")
    from tests.trainer.frames import tiny_frame
    from trainer.run_dir import FINAL_CHECKPOINT

    frame = tiny_frame(200, seed=1)
    qc = quality.QualityConfig(steps=8, batch_size=32, eval_every=4, sequence_length=12)
    spec = SimpleNamespace(model_profile_features=(), tasks=("click",))
    mcfg = quality_data.model_config("single:click", frame, spec, qc)
    run = tmp_path / "single-click-s0"
    cfg = quality_data.train_config("single:click", mcfg, 0, run, qc)
    assert not quality._trained_with(run, cfg)  # nothing there
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps(cfg.to_dict()))
    assert not quality._trained_with(run, cfg)  # cut short: no final model
    (run / FINAL_CHECKPOINT).write_bytes(b"")
    assert quality._trained_with(run, cfg)
    other = quality_data.train_config("single:click", mcfg, 0, run, replace(qc, steps=16))
    assert not quality._trained_with(run, other)  # another budget
    assert not quality._trained_with(run, cfg.with_(seed=1))
    # A config saved before a field was added reads back with the field's default.
    older = {k: v for k, v in cfg.to_dict().items() if k != "distill_teachers"}
    (run / "train_config.json").write_text(json.dumps(older))
    assert quality._trained_with(run, cfg)
    (run / "train_config.json").write_text("{}")
    assert not quality._trained_with(run, cfg)


def test_auc_standard_error_matches_a_bootstrap_of_the_test_split() -> None:
    """The SE row of the quality table: Hanley-McNeil from the counts agrees with resampling
    the split itself (89 positives as in the MovieLens test cut, and a large split). Its
    exponential-score model runs up to a quarter high on normal scores: never far below."""
    from sklearn.metrics import roc_auc_score

    quality = _bench_module("quality_probes")
    rng = np.random.default_rng(0)
    for pos, neg in ((89, 813), (3000, 7000)):
        y = np.r_[np.ones(pos), np.zeros(neg)]
        score = rng.normal(size=pos + neg) + 1.2 * y  # AUC about 0.80
        auc = roc_auc_score(y, score)
        boot = []
        for _ in range(400):
            i = np.r_[rng.integers(0, pos, pos), pos + rng.integers(0, neg, neg)]
            boot.append(roc_auc_score(y[i], score[i]))
        se = quality.auc_standard_error(auc, pos, neg)
        assert 0.9 < se / np.std(boot) < 1.35, (pos, neg, se, np.std(boot))
    assert np.isnan(quality.auc_standard_error(0.7, 0, 10))


def test_perf_smoke_reports_each_figure_beside_its_reference(tmp_path: Path) -> None:
    suites = "serving,refresh,encoder,data,training,moe_scaling"
    out = _run(["bench/perf.py", "--smoke", "--only", suites], 1200)
    assert set(out["suites"]) == set(suites.split(","))
    assert all(s["ok"] for s in out["suites"].values()), out["suites"]
    by_suite: dict[str, list[dict]] = {}
    for f in out["figures"]:
        by_suite.setdefault(f["suite"], []).append(f)
    serving = {f["name"] for f in by_suite["serving"]}
    assert {"batch path users/s (100 per call)", "stored path req/s, concurrency 16"} <= serving
    references = {f["reference"] for f in by_suite["serving"]}
    assert "echo + one HMGET of the vector" in references
    assert "miss path users/s (online features + encoder)" in serving
    assert "miss path users/s, 64 ids per call" in serving
    stored = out["suites"]["serving"]["result"]["stored_path"]["16"]
    assert stored["speedup_vs_baseline"] > 0 and stored["baseline_req_s"] > 0  # --baseline-env
    sides = {"echo", "echo_redis", "server", "baseline"}
    # one_worker: the same server as one process, beside a server of several workers
    assert sides <= set(stored["cpu_us_per_call"]) <= sides | {"one_worker"}
    assert stored["echo_redis_req_s"] > 0 and stored["ratio_vs_echo_redis"] > 0
    assert out["suites"]["serving"]["result"]["load_client"] == "h2"  # the default client
    for suite in ("serving", "encoder", "moe_scaling", "refresh", "training"):
        assert by_suite[suite], suite
        for f in by_suite[suite]:
            assert f["value"] > 0 and f["reference_value"] > 0 and f["ratio"] > 0, f


def test_perf_merge_remeasures_only_the_suites_asked_for(tmp_path: Path) -> None:
    saved = tmp_path / "perf.json"
    first = _run(["bench/perf.py", "--smoke", "--only", "data", "--out", str(saved)], 600)
    merged = _run(
        ["bench/perf.py", "--smoke", "--only", "encoder", "--merge", "--out", str(saved)], 600
    )
    assert set(merged["suites"]) == {"data", "encoder"} and merged["merged"]
    assert merged["suites"]["data"] == first["suites"]["data"]  # kept, with its own time
    assert {f["suite"] for f in merged["figures"]} == {"data", "encoder"}
    assert json.loads(saved.read_text())["suites"]["data"] == first["suites"]["data"]
    md = _bench_module("perf").markdown(merged)
    assert f"data {first['suites']['data']['measured']}" in md, md
    assert "Suites measured at different times" not in _bench_module("perf").markdown(first)
    refused = subprocess.run(
        [sys.executable, "bench/perf.py", "--smoke", "--only", "data", "--merge",
         "--out", str(tmp_path / "missing.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2 and "--merge needs --out" in refused.stderr


def test_moe_gpu_bench_runs_on_cpu_and_compares_both_dispatches() -> None:
    # The GPU check (bench/moe_gpu.py) must not rot between the sessions that have a GPU.
    out = _run(
        ["bench/moe_gpu.py", "--device", "cpu", "--batch-size", "8", "--steps", "1",
         "--length", "8", "--dim", "16", "--hidden", "16"],
        300,
    )  # fmt: skip
    for dispatch in ("sorted", "masked"):
        for k in (1, 2):
            assert out[f"{dispatch}_top{k}_ratio_16_vs_4"] > 0


def test_train_quality_smoke_reports_every_comparison_beside_bayes() -> None:
    out = _run(
        ["bench/train_quality.py", "--users", "1500", "--max-steps", "6", "--eval-every", "3",
         "--batch-size", "64", "--skip-movielens"],
        600,
    )  # fmt: skip
    tasks = out["synthetic"]["tasks"]
    assert set(tasks) == {"click", "purchase", "churn", "explore"}
    for row in tasks.values():
        for key in ("multi", "plain", "single", "bayes"):
            assert 0.0 < row[key] < 1.0, row
    assert "within_0.03_of_bayes" in out["bars"]


def test_resume_reuses_a_distilled_run_only_with_as_many_teachers(tmp_path: Path) -> None:
    """The log keeps single-task runs across a change of distill_teachers; a distilled run
    counts only for the teacher count it was trained with (none logged: one)."""
    quality = _bench_module("quality")
    qc = quality.QualityConfig(steps=8)
    rows = {"train": 10}
    base = {"dataset": "d", "budget": quality._budget(qc), "frame_rows": rows}
    log = tmp_path / "runs.jsonl"
    recs = [
        {**base, "model": "single:a", "seed": 0},  # logged before teacher ensembles
        {**base, "model": "supermoe_distilled", "seed": 0},  # idem: one teacher per task
        {**base, "model": "supermoe_distilled", "seed": 1, "distill_teachers": 3},
        {**base, "model": "mmoe", "seed": 0, "distill_teachers": None},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert set(quality.load_done(log, "d", qc, rows)) == {
        ("single:a", 0),
        ("supermoe_distilled", 1),
        ("mmoe", 0),
    }
    one = replace(qc, distill_teachers=1)
    assert set(quality.load_done(log, "d", one, rows)) == {
        ("single:a", 0),
        ("supermoe_distilled", 0),
        ("mmoe", 0),
    }
    assert quality.load_done(log, "d", replace(qc, steps=9), rows) == {}  # another budget


def test_a_single_task_run_is_trained_once_and_its_lock_serialises_processes(
    tmp_path: Path,
) -> None:
    """A single-task run is also a teacher of earlier seeds: whoever comes second reuses it
    (same figures, no retraining), and the lock makes the second one wait."""
    import threading

    quality, quality_data = _bench_module("quality"), _bench_module("quality_data")
    from tests.trainer.dist_worker import PROFILE
    from tests.trainer.frames import tiny_frame
    from trainer.run_dir import FINAL_CHECKPOINT

    frame = tiny_frame(200, seed=1)
    qc = quality.QualityConfig(steps=8, batch_size=32, eval_every=4, sequence_length=12)
    spec = SimpleNamespace(model_profile_features=PROFILE, tasks=("click",))
    run = tmp_path / "runs" / "single-click-s0"
    cfg = quality_data.train_config(
        "single:click", quality_data.model_config("single:click", frame, spec, qc), 0, run, qc
    )
    first = quality._train_or_reuse(cfg, frame)
    assert set(first[0]) == {"click"} and first[1] == 8 and first[3] > 0
    stamp = (run / FINAL_CHECKPOINT).stat().st_mtime_ns
    assert quality._train_or_reuse(cfg, frame) == first  # reused, training time included
    assert (run / FINAL_CHECKPOINT).stat().st_mtime_ns == stamp

    order: list[str] = []
    held = threading.Event()

    def holder() -> None:
        with quality._run_lock(run):
            held.set()
            time.sleep(0.3)
            order.append("holder done")

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    with quality._run_lock(run):
        order.append("second in")
    t.join()
    assert order == ["holder done", "second in"]
