"""A pickle planted where the trainer reads its own files (model.pt, a checkpoint) is refused
with one UnsafeFileError and never runs (the files the trainer writes load: test_train's resume
test, test_distributed's sharded resume)."""

from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path

import pytest
import torch

from tests.trainer.dist_worker import tiny_config
from tests.trainer.frames import tiny_frame
from trainer.export import export_model
from trainer.model import load_final, load_unsharded
from trainer.run_dir import RunDir
from trainer.train import train
from userembed.errors import UnsafeFileError


class _Planted:
    """Unpickling it runs a shell command: what an attacker with write access would plant."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path, form: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"model_config": _Planted(marker), "tables": {"t": torch.zeros(2)}}
    if form == "torch.save":
        torch.save(blob, path)
    else:
        path.write_bytes(pickle.dumps(blob, protocol=2))


@pytest.fixture(params=["torch.save", "pickle"])
def planted(request, tmp_path: Path):  # type: ignore[no-untyped-def]
    """(run folder with a planted model.pt and checkpoint, marker file the payload creates)."""
    run = RunDir(tmp_path / "run")
    marker = tmp_path / "code-ran"
    _plant(run.model, marker, request.param)
    _plant(run.checkpoint(0), marker, request.param)
    # The payload is live: a load with weights_only=False runs it (a bare pickle then fails
    # torch's magic-number check, too late).
    with contextlib.suppress(RuntimeError):
        torch.load(run.model, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return run, marker


def test_planted_model_file_is_refused_by_every_reader(planted) -> None:  # type: ignore[no-untyped-def]
    run, marker = planted
    for read in (load_final, load_unsharded, export_model):
        with pytest.raises(UnsafeFileError, match=r"model\.pt: refused to load .*posix\.system"):
            read(run.model)
    assert not marker.exists()


def test_planted_checkpoint_is_refused_on_resume(planted) -> None:  # type: ignore[no-untyped-def]
    run, marker = planted
    frame = tiny_frame(400)
    cfg = tiny_config(str(run.root), frame, max_steps=20)
    with pytest.raises(UnsafeFileError, match=r"latest-rank0\.pt: refused to load"):
        train(cfg, frame, resume=True)
    assert not marker.exists()
