"""Single-process training: one step updates every part, a run learns and reports, and a resumed
run equals an uninterrupted one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.trainer.dist_worker import tiny_config
from tests.trainer.frames import tiny_frame
from trainer.batches import encode_split, iterate_batches
from trainer.distributed import DistContext
from trainer.model import SuperMoEModel, load_final
from trainer.run_dir import FINAL_CHECKPOINT, PLOT_FILES, RunDir
from trainer.step import prepare, train_step
from trainer.train import train


@pytest.fixture(scope="module")
def frame():  # type: ignore[no-untyped-def]
    return tiny_frame(1000, seed=1)


def test_one_train_step_updates_tables_and_dense_weights(frame, tmp_path: Path) -> None:
    cfg = tiny_config(str(tmp_path / "unused"), frame)
    spec = cfg.model.input_spec
    split = encode_split(frame[frame["split"] == "train"], spec, cfg.model.task_names)
    batch = next(iterate_batches(split, spec, cfg.batch_size))
    model, optim = prepare(SuperMoEModel(cfg.model), cfg, DistContext())
    assert isinstance(model, SuperMoEModel)
    tables = model.table_weights()
    dense = {k: v.clone() for k, v in model.dense_arch.state_dict().items()}
    out, loss = train_step(model, batch, optim)
    assert torch.isfinite(loss.total) and out.task_logits.shape == (cfg.batch_size, 2)
    # The tables' Adagrad runs inside backward; AdamW and the schedule step after it.
    assert any(not torch.equal(tables[n], t) for n, t in model.table_weights().items())
    assert any(not torch.equal(dense[k], v) for k, v in model.dense_arch.state_dict().items())
    assert optim.scheduler.last_epoch == 1


def test_short_cpu_run_beats_trivial_baseline_on_every_task(frame, tmp_path: Path) -> None:
    cfg = tiny_config(str(tmp_path / "run"), frame, max_steps=150, eval_every=50, plots=True)
    result = train(cfg, frame)
    for task, m in result.test_metrics.items():
        assert m["auc"] > 0.6, (task, m)
        assert m["log_loss"] < m["prior_log_loss"], (task, m)
    run = RunDir(cfg.run_dir)
    report = json.loads(run.report.read_text())
    assert set(report["test"]) == {"click", "buy"}
    assert len(report["expert_load"]) == cfg.model.num_layers
    for layer in report["expert_load"]:
        assert math.isclose(sum(layer["token_share"]), 1.0, rel_tol=1e-5)
    assert run.plots() == [run.plot(p) for p in PLOT_FILES]
    assert all(p.stat().st_size > 1000 for p in run.plots())
    saved = run.read_config()  # the sized config: min_steps filled in
    assert saved == cfg.sized_like(saved) and saved.min_steps == 4 * cfg.warmup_steps
    assert run.heldout_inputs.is_file() and run.model.is_file()


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
