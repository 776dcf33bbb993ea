"""Distillation from single-task teachers: targets, teacher predictions, and the wiring in train()."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.trainer.dist_worker import tiny_config
from tests.trainer.frames import tiny_frame
from trainer.batches import encode_split
from trainer.config import TrainConfig
from trainer.distill import annealing, distill_targets, platt, teacher_probs
from trainer.distributed import DistContext
from trainer.evaluate import predict
from trainer.model import load_unsharded
from trainer.run_dir import FINAL_CHECKPOINT
from trainer.teachers import own_teachers, teacher_config, train_teachers
from trainer.train import train
from userembed.errors import InvalidInputError

NAN = math.nan


@pytest.fixture(scope="module")
def frame():  # type: ignore[no-untyped-def]
    return tiny_frame(600, seed=2)


@pytest.fixture(scope="module")
def click_teacher(frame, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    run = tmp_path_factory.mktemp("teacher") / "click"
    # 60 steps: a teacher of 40 ranks click at about 0.70, too weak a target for the student test
    cfg = tiny_config(str(run), frame, max_steps=60)
    # as teacher_config trains one: its own task, no whole-history objective
    cfg = cfg.with_(model=replace(cfg.model, task_names=("click",)), summary_loss_weight=0.0)
    train(cfg, frame)
    return run


def test_targets_go_from_teacher_to_label_and_unlabelled_rows_follow_the_teacher() -> None:
    labels = torch.tensor([[1.0, NAN], [0.0, 1.0], [NAN, NAN]])
    teacher = torch.tensor([[0.8, 0.3], [NAN, 0.6], [0.7, NAN]])  # NaN: no teacher
    start = distill_targets(labels, teacher, 0.0)
    torch.testing.assert_close(
        start, torch.tensor([[0.8, 0.3], [0.0, 0.6], [0.7, NAN]]), equal_nan=True
    )
    half = distill_targets(labels, teacher, 0.5)
    torch.testing.assert_close(
        half, torch.tensor([[0.9, 0.3], [0.0, 0.8], [0.7, NAN]]), equal_nan=True
    )
    end = distill_targets(labels, teacher, 1.0)  # labels, and the teacher where there is none
    torch.testing.assert_close(
        end, torch.tensor([[1.0, 0.3], [0.0, 1.0], [0.7, NAN]]), equal_nan=True
    )
    assert [annealing(s, 100) for s in (0, 25, 100, 150)] == [0.0, 0.25, 1.0, 1.0]
    # distill_label_share caps the label's share: 0 (the default) keeps the teacher all run.
    assert [annealing(s, 100, 0.5) for s in (0, 25, 100)] == [0.0, 0.25, 0.5]
    assert [annealing(s, 100, 0.0) for s in (0, 100)] == [0.0, 0.0]


def test_teacher_probs_are_the_teachers_own_predictions(
    frame, click_teacher: Path, caplog: pytest.LogCaptureFixture
) -> None:
    part = frame[frame["split"] == "train"]
    with caplog.at_level(logging.INFO, logger="trainer.distill"):
        probs = teacher_probs({"click": (str(click_teacher),)}, part, ("click", "buy"))
        fits = [r for r in caplog.records if "calibrated" in r.getMessage()]
        assert len(fits) == 1 and fits[0].getMessage().startswith("teacher click")
        # Under torchrun only rank 0 logs the fit; every rank computes the same targets.
        caplog.clear()
        quiet = teacher_probs({"click": (str(click_teacher),)}, part, ("click", "buy"), log=False)
        assert not [r for r in caplog.records if "calibrated" in r.getMessage()]
    np.testing.assert_array_equal(quiet, probs)
    assert probs.shape == (len(part), 2)
    assert np.isnan(probs[:, 1]).all()  # no teacher for buy
    teacher = load_unsharded(click_teacher / FINAL_CHECKPOINT)
    cfg = tiny_config("unused", frame).with_(model=teacher.cfg)
    expected, _ = predict(
        teacher, encode_split(part, teacher.cfg.input_spec, ()), cfg, DistContext()
    )
    raw = teacher_probs({"click": (str(click_teacher),)}, part, ("click",), calibrate=False)
    np.testing.assert_allclose(raw[:, 0], expected[:, 0], atol=1e-6)
    assert raw[:, 0].std() > 0.05  # a trained teacher, not a constant
    # Calibrated: the same ranking (a monotone map of the logit), the labels' base rate.
    order = np.argsort(expected[:, 0], kind="stable")
    assert (np.diff(probs[order, 0]) >= -1e-6).all()
    y = part["label_click"].to_numpy(dtype=np.float64)
    assert probs[:, 0].mean() == pytest.approx(y.mean(), abs=0.01)


def test_platt_scaling_fits_the_labelled_rows_and_never_reverses_a_teacher() -> None:
    rng = np.random.default_rng(0)
    # A near-constant teacher (logit spread 0.02) whose ranking is right: the soft targets
    # a student learns from must spread out, or they carry no ranking (MovieLens rate_high).
    z = rng.normal(size=20_000) * 0.02
    y = (rng.random(z.size) < 1 / (1 + np.exp(-(40 * z + 1.5)))).astype(np.float64)
    y_some = y.copy()
    y_some[::3] = np.nan  # unlabelled rows are left out of the fit
    for labels in (y, y_some):
        a, b = platt(z, labels)
        assert a == pytest.approx(40, rel=0.15) and b == pytest.approx(1.5, abs=0.1)
    a, b = platt(-z, y)  # ranks the wrong way round: the base rate, not the reverse
    assert a == 0.0 and 1 / (1 + math.exp(-b)) == pytest.approx(y.mean())
    assert platt(z, np.full(z.size, np.nan)) == (1.0, 0.0)  # nothing labelled: unchanged


def test_a_student_trains_on_the_teacher_and_learns(frame, click_teacher: Path, tmp_path) -> None:
    kw = dict(max_steps=60, eval_every=30, log_every=10)
    plain = train(tiny_config(str(tmp_path / "plain"), frame, **kw), frame)
    cfg = tiny_config(
        str(tmp_path / "student"), frame, teachers={"click": str(click_teacher)}, **kw
    )
    student = train(cfg, frame)
    # Same seed, same batches: only the click targets differ, so only click's loss history.
    loss = [h["loss"] for h in student.report["history"]["train"]]
    ref = [h["loss"] for h in plain.report["history"]["train"]]
    assert loss[0]["click"] != pytest.approx(ref[0]["click"], abs=1e-4)
    assert student.test_auc["click"] > 0.6 and student.test_auc["buy"] > 0.6


def test_bad_teachers_are_refused(frame, click_teacher: Path, tmp_path) -> None:
    with pytest.raises(InvalidInputError, match="tasks the model does not have"):
        tiny_config(str(tmp_path / "a"), frame, teachers={"nope": str(click_teacher)})
    missing = tiny_config(str(tmp_path / "b"), frame, teachers={"click": str(tmp_path / "none")})
    with pytest.raises(InvalidInputError, match="no trained model"):
        train(missing, frame)
    with pytest.raises(InvalidInputError, match="distill_label_share"):
        tiny_config(str(tmp_path / "d"), frame, distill_label_share=1.5)
    wrong = tiny_config(str(tmp_path / "c"), frame, teachers={"buy": str(click_teacher)})
    with pytest.raises(InvalidInputError, match="not 'buy'"):
        train(wrong, frame)


def test_a_run_trains_its_own_teachers_resumes_a_cut_one_and_skips_finished_ones(
    frame, tmp_path
) -> None:
    cfg = tiny_config(str(tmp_path / "kd"), frame, max_steps=20, eval_every=10, seed=5)
    cfg = cfg.with_(distill_teachers=2)
    cfg = cfg.with_(teachers=own_teachers(cfg))
    buy = teacher_config(cfg, "buy", 1)  # the second buy teacher: the next seed
    assert buy.model.task_names == ("buy",) and buy.teachers is None and buy.seed == 6
    assert buy.summary_loss_weight == 0.0 < cfg.summary_loss_weight  # its vector is never served
    assert buy.run_dir == str(tmp_path / "kd" / "teachers" / "buy-s6")
    train(buy, frame, stop_after_steps=10)  # cut short: a checkpoint, no model.pt

    assert train_teachers(cfg, frame) == ["click-s5", "click-s6", "buy-s5", "buy-s6"]
    for name in ("click-s5", "click-s6", "buy-s5", "buy-s6"):
        report = json.loads((tmp_path / "kd" / "teachers" / name / "report.json").read_text())
        assert report["steps"] == 20 and set(report["test"]) == {name.split("-")[0]}
    assert train_teachers(cfg, frame) == []  # all finished: nothing is trained again

    # The target is the mean of a task's teachers' calibrated probabilities; two seeds give
    # two different teachers, so the mean is a real average.
    part = frame[frame["split"] == "train"]
    tasks = ("click", "buy")
    assert cfg.teachers is not None
    each = [teacher_probs({"click": (d,)}, part, tasks, log=False) for d in cfg.teachers["click"]]
    assert np.abs(each[0][:, 0] - each[1][:, 0]).max() > 1e-3
    both = teacher_probs(cfg.teachers, part, tasks, log=False)
    np.testing.assert_allclose(both[:, 0], (each[0][:, 0] + each[1][:, 0]) / 2, rtol=1e-6)
    assert not np.isnan(both).any()  # buy has teachers too


def test_teachers_read_back_from_json_and_bad_counts_are_refused(frame, tmp_path) -> None:
    # A bare run dir (configs saved before teacher ensembles) is a one-teacher tuple.
    cfg = tiny_config(str(tmp_path / "a"), frame, teachers={"click": "/runs/t"})
    assert cfg.teachers == {"click": ("/runs/t",)}
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(InvalidInputError, match="no teacher run given for tasks \\['click'\\]"):
        tiny_config(str(tmp_path / "b"), frame, teachers={"click": ()})
    with pytest.raises(InvalidInputError, match="distill_teachers 0"):
        tiny_config(str(tmp_path / "c"), frame, distill_teachers=0)
