"""Single-process training: it learns, it reports, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.trainer.dist_worker import tiny_config
from tests.trainer.frames import tiny_frame
from trainer.model import FINAL_CHECKPOINT, load_final
from trainer.train import train


@pytest.fixture(scope="module")
def frame():  # type: ignore[no-untyped-def]
    return tiny_frame(1000, seed=1)


def test_short_cpu_run_beats_trivial_baseline_on_every_task(frame, tmp_path: Path) -> None:
    cfg = tiny_config(str(tmp_path / "run"), frame, max_steps=150, eval_every=50, plots=True)
    result = train(cfg, frame)
    for task, m in result.test_metrics.items():
        assert m["auc"] > 0.6, (task, m)
        assert m["log_loss"] < m["prior_log_loss"], (task, m)
    run = Path(cfg.run_dir)
    report = json.loads((run / "report.json").read_text())
    assert set(report["test"]) == {"click", "buy"}
    assert len(report["expert_load"]) == cfg.model.num_layers
    for layer in report["expert_load"]:
        assert math.isclose(sum(layer["token_share"]), 1.0, rel_tol=1e-5)
    for png in ("loss.png", "auc.png", "expert_load.png"):
        assert (run / png).stat().st_size > 1000


def test_resumed_run_equals_uninterrupted_run(frame, tmp_path: Path) -> None:
    # The tiny config keeps dropout 0; RNG state is checkpointed for runs that use it.
    kw = dict(max_steps=40, eval_every=20, checkpoint_every=20)
    full = train(tiny_config(str(tmp_path / "full"), frame, **kw), frame)

    cfg = tiny_config(str(tmp_path / "resumed"), frame, **kw)
    partial = train(cfg, frame, stop_after_steps=20)
    assert partial.steps == 20 and not (tmp_path / "resumed" / FINAL_CHECKPOINT).exists()
    resumed = train(cfg, frame, resume=True)

    assert resumed.steps == full.steps == 40
    for task in full.test_metrics:
        assert resumed.test_auc[task] == pytest.approx(full.test_auc[task], abs=1e-6)
    _, tables_a, dense_a = load_final(tmp_path / "full" / FINAL_CHECKPOINT)
    _, tables_b, dense_b = load_final(tmp_path / "resumed" / FINAL_CHECKPOINT)
    for name, t in tables_a.items():
        torch.testing.assert_close(tables_b[name], t, atol=1e-6, rtol=0)
    for (name, a), (_, b) in zip(
        dense_a.state_dict().items(), dense_b.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
