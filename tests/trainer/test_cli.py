"""`userembed train` end to end: data build -> feast apply -> Feast training frame -> run dir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from userembed.commands import main as cli


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str) -> Path:
    monkeypatch.setenv("USEREMBED_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.delenv("USEREMBED_OFFLINE_DIR", raising=False)
    monkeypatch.delenv("USEREMBED_FEAST_REGISTRY", raising=False)
    return tmp_path / "home"


@pytest.mark.slow
def test_train_command_reads_the_feast_frame_and_writes_the_run_dir(home: Path, capsys) -> None:
    assert cli.main(["data", "build", "--source", "synthetic", "--users", "300"]) == 0
    assert cli.main(["feast", "apply"]) == 0
    argv = ["train", "--run-id", "r1", "--max-steps", "20",
            "--batch-size", "64", "--eval-every", "10", "--embedding-dim", "16",
            "--num-experts", "4", "--num-experts-per-tok", "1"]  # fmt: skip
    assert cli.main(argv) == 0
    run = home / "runs" / "r1"
    report = json.loads((run / "report.json").read_text())
    assert set(report["test"]) == {"click", "purchase", "churn", "explore"}
    cfg = json.loads((run / "train_config.json").read_text())
    assert cfg["model"]["moe"]["num_experts_per_tok"] == 1
    assert [f["name"] for f in cfg["model"]["input_spec"]["profile_features"]] == [
        "age_bucket",
        "region",
    ]
    assert (run / "model.pt").is_file()
    assert "run r1: 20 steps" in capsys.readouterr().out

    # A one-task run, then a run that distils click from it (docs/model.md, distillation).
    small = [
        "--max-steps",
        "10",
        "--batch-size",
        "64",
        "--eval-every",
        "10",
        "--embedding-dim",
        "16",
    ]
    assert cli.main(["train", "--run-id", "t-click", "--tasks", "click", *small]) == 0
    assert set(json.loads((home / "runs" / "t-click" / "report.json").read_text())["test"]) == {
        "click"
    }
    assert cli.main(["train", "--run-id", "r2", "--teacher", "click=t-click", *small]) == 0
    cfg = json.loads((home / "runs" / "r2" / "train_config.json").read_text())
    assert cfg["teachers"] == {"click": [str(home / "runs" / "t-click")]}
    # --distill trains its own teachers (2 per task here, at seeds 0 and 1); a resume after a
    # cut during the teachers finishes the missing teacher and then trains the model.
    distill = ["--distill", "--distill-teachers", "2"]
    assert cli.main(["train", "--run-id", "kd", *distill, *small]) == 0
    kd = home / "runs" / "kd"
    churn = [str(kd / "teachers" / f"churn-s{s}") for s in (0, 1)]
    assert json.loads((kd / "train_config.json").read_text())["teachers"]["churn"] == churn
    for done in ("model.pt", "checkpoints"):
        shutil.rmtree(kd / done) if (kd / done).is_dir() else (kd / done).unlink()
    shutil.rmtree(churn[1])
    capsys.readouterr()
    assert cli.main(["train", "--run-id", "kd", "--resume"]) == 0
    assert (Path(churn[1]) / "model.pt").is_file() and (kd / "model.pt").is_file()
    assert "run kd: 10 steps" in capsys.readouterr().out
    assert cli.main(["train", "--run-id", "r3", "--tasks", "click,clicks"]) == 2
    assert "unknown tasks ['clicks']: this data set has click, purchase" in capsys.readouterr().err


def test_resume_without_run_id_is_one_line_error(home: Path, capsys) -> None:
    assert cli.main(["train", "--resume"]) == 2
    assert "--resume needs --run-id" in capsys.readouterr().err


def test_resume_with_training_options_is_refused_not_ignored(home: Path, capsys) -> None:
    assert cli.main(["train", "--run-id", "r1", "--resume", "--max-steps", "10"]) == 2
    err = capsys.readouterr().err
    assert "saved config" in err and "--max-steps" in err


@pytest.mark.parametrize(
    ("teacher", "message"),
    [("click", "expected TASK=RUN"), ("click=nowhere", "no trained model at")],
)
def test_a_bad_teacher_is_refused_before_any_data_is_read(
    home: Path, capsys, teacher: str, message: str
) -> None:
    assert cli.main(["train", "--run-id", "r1", "--teacher", teacher]) == 2
    assert message in capsys.readouterr().err


def test_resume_with_a_teacher_is_refused(home: Path, capsys) -> None:
    (home / "runs" / "t").mkdir(parents=True)
    (home / "runs" / "t" / "model.pt").write_bytes(b"")
    assert cli.main(["train", "--run-id", "r1", "--resume", "--teacher", "click=t"]) == 2
    assert "--teacher would be ignored" in capsys.readouterr().err


def test_the_same_teacher_twice_is_refused(home: Path, capsys) -> None:
    (home / "runs" / "t").mkdir(parents=True)
    (home / "runs" / "t" / "model.pt").write_bytes(b"")
    argv = ["train", "--run-id", "r1", "--teacher", "click=t", "--teacher", "click=t"]
    assert cli.main(argv) == 2
    assert "the same teacher twice for 'click'" in capsys.readouterr().err


def test_distill_with_a_teacher_or_on_resume_is_refused(home: Path, capsys) -> None:
    assert cli.main(["train", "--run-id", "r1", "--distill", "--teacher", "click=t"]) == 2
    assert "drop --teacher" in capsys.readouterr().err
    assert cli.main(["train", "--run-id", "r1", "--distill-teachers", "2"]) == 2
    assert "add --distill" in capsys.readouterr().err
    assert cli.main(["train", "--run-id", "r1", "--resume", "--distill"]) == 2
    assert "--distill would be ignored" in capsys.readouterr().err


def test_bad_task_weighting_is_refused_before_any_data_is_read(home: Path, capsys) -> None:
    # no `data build` ran: the option error must come first, not a missing-data error
    # after a minute of building the training frame
    assert cli.main(["train", "--run-id", "r1", "--task-weighting", "labeled"]) == 2
    assert "expected fixed, labelled, uncertainty" in capsys.readouterr().err
