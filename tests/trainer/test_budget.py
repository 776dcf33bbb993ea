"""The training budget fits the data: steps sized from the training rows (epochs), a validation
score that skips (and names) a task whose validation cut holds one class, and one clear error
for a data set too small to split."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest

from tests.trainer.dist_worker import tiny_config
from tests.trainer.frames import tiny_frame
from trainer.config import MAX_EVAL_EVERY, steps_per_epoch
from trainer.run_dir import RunDir
from trainer.train import MIN_SPLIT_ROWS, train
from userembed.commands import main as cli
from userembed.errors import InvalidInputError


@pytest.fixture(scope="module")
def frame():  # type: ignore[no-untyped-def]
    return tiny_frame(400, seed=2)


def test_steps_are_epochs_of_the_training_rows_unless_given(frame, tmp_path: Path) -> None:
    cfg = tiny_config(str(tmp_path), frame, max_steps=None, eval_every=None, epochs=20)
    # MovieLens as a team's files: 3,200 training rows, 12 full batches of 256 an epoch
    small = cfg.with_(batch_size=256).sized(3200)
    assert (small.max_steps, small.eval_every) == (240, 12)
    # no score inside the warm-up picks the model or ends the run
    assert small.min_steps == 4 * small.warmup_steps
    assert cfg.with_(batch_size=256, epochs=1).sized(3200).min_steps == 12  # capped
    assert cfg.with_(batch_size=256).sized(3200, world_size=2).max_steps == 120
    # a long epoch is scored every MAX_EVAL_EVERY steps, not once
    large = cfg.with_(batch_size=256, epochs=2.5).sized(200_000)
    assert large.max_steps == math.ceil(2.5 * 781) and large.eval_every == MAX_EVAL_EVERY
    # fewer rows than one batch still train: one (partial) batch an epoch
    assert steps_per_epoch(10, 256) == 1
    given = cfg.with_(max_steps=1500, eval_every=150).sized(3200)
    assert (given.max_steps, given.eval_every) == (1500, 150)
    with pytest.raises(InvalidInputError, match="epochs 0"):
        cfg.with_(epochs=0.0)


def test_a_run_without_max_steps_trains_its_epochs_and_saves_the_sized_budget(
    frame, tmp_path: Path
) -> None:
    cfg = tiny_config(str(tmp_path / "run"), frame, max_steps=None, eval_every=None, epochs=2)
    cfg = cfg.with_(patience=0, plots=False)
    result = train(cfg, frame)
    per_epoch = int((frame["split"] == "train").sum()) // cfg.batch_size
    assert result.steps == 2 * per_epoch
    saved = RunDir(cfg.run_dir).read_config()  # what --resume continues with
    assert (saved.max_steps, saved.eval_every, saved.epochs) == (2 * per_epoch, per_epoch, 2)
    evaluated = [h["step"] for h in result.report["history"]["validation"]]
    assert evaluated == [per_epoch, 2 * per_epoch]


def test_a_validation_cut_with_one_class_is_skipped_and_named(
    frame, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    one_class = frame.copy()
    val = one_class["split"] == "validation"
    one_class.loc[val & one_class["label_buy"].notna(), "label_buy"] = 1.0
    cfg = tiny_config(str(tmp_path / "run"), one_class, max_steps=20, eval_every=10, plots=False)
    with caplog.at_level(logging.WARNING, logger="trainer.train"):
        result = train(cfg, one_class)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "skips buy" in warning and "all 1" in warning
    for h in result.report["history"]["validation"]:
        # the score is click's AUC alone, never NaN
        assert np.isfinite(h["val_score"]) and h["val_score"] == h["auc"]["click"]
    assert np.isfinite(result.test_auc["buy"])  # the test cut still scores it


def test_with_nothing_to_score_the_last_evaluation_is_the_final_model(
    frame, tmp_path: Path
) -> None:
    one_class = frame.copy()
    val = one_class["split"] == "validation"
    for task in ("click", "buy"):
        one_class.loc[val & one_class[f"label_{task}"].notna(), f"label_{task}"] = 0.0
    cfg = tiny_config(str(tmp_path / "run"), one_class, max_steps=20, eval_every=10)
    cfg = cfg.with_(plots=False, future_loss_weight=0.0)
    result = train(cfg, one_class)
    assert result.best_step == 20 and not result.stopped_early
    assert RunDir(cfg.run_dir).model.is_file()


def test_scores_before_min_steps_neither_pick_the_model_nor_stop_the_run(
    frame, tmp_path: Path
) -> None:
    cfg = tiny_config(str(tmp_path / "run"), frame, max_steps=40, eval_every=5, min_steps=25)
    result = train(cfg.with_(patience=1, plots=False), frame)
    scored = [h["step"] for h in result.report["history"]["validation"]]
    assert scored[:5] == [5, 10, 15, 20, 25]  # patience 1 counts from step 25 on
    assert result.best_step >= 25


def test_a_data_set_too_small_to_split_is_one_clear_error(frame, tmp_path: Path) -> None:
    two_cuts = frame[frame["split"] != "validation"]  # e.g. labels at two times only
    cfg = tiny_config(str(tmp_path / "run"), two_cuts)
    with pytest.raises(InvalidInputError) as e:
        train(cfg, two_cuts)
    message = str(e.value)
    assert "\n" not in message and "too small to split" in message
    assert f"train {(two_cuts['split'] == 'train').sum()} / validation 0 / test" in message
    assert f"at least {MIN_SPLIT_ROWS}" in message


def test_train_help_states_the_budget(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--epochs" in text and "passes over the training rows" in text
    assert "it wins over --epochs" in text
