"""2-process gloo torchrun: sharded training; gathered tables in an unsharded model agree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.trainer.frames import tiny_frame
from trainer.batches import encode_split, make_batch
from trainer.config import TrainConfig
from trainer.model import SuperMoEModel

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sharded_training_gathers_tables_that_reproduce_outputs(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node=2",
            "tests/trainer/dist_worker.py",
            str(tmp_path),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "plan sparse_arch.ec.t_item_seq: row_wise" in proc.stderr
    assert proc.stderr.count("resumed from") == 2, "each rank resumed its sharded checkpoint"
    sharded = torch.load(tmp_path / "sharded.pt", weights_only=True)
    assert sharded["world_size"] == 2

    cfg = TrainConfig.from_dict(json.loads((tmp_path / "run" / "train_config.json").read_text()))
    model = SuperMoEModel(cfg.model)
    model.load_table_weights(sharded["tables"])
    model.dense_arch.load_state_dict(sharded["dense_arch"])
    model.eval()
    frame = tiny_frame(400)
    spec = cfg.model.input_spec
    test = encode_split(frame[frame["split"] == "test"], spec, cfg.model.task_names)
    import numpy as np

    batch = make_batch(test, np.arange(48), spec)
    with torch.no_grad():
        out, _ = model(batch.seq_kjt, batch.profile_kjt, None, long_term=batch.long_term)
    torch.testing.assert_close(out.user_vector, sharded["user_vector"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.task_logits, sharded["task_logits"], atol=1e-5, rtol=1e-5)
    # Training moved the tables away from their initialisation on both shards.
    assert (REPO / "trainer").exists() and (tmp_path / "run" / "model.pt").exists()
    # The self-supervised objective ran sharded: its targets went through the sharded tables.
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert cfg.future_loss_weight > 0
    future = [h["future_loss"] for h in report["history"]["train"]]
    assert future and all(0 < v < 20 for h in future for v in h.values())
    assert all(0 <= m["auc"] <= 1 for m in report["future_test"].values())
