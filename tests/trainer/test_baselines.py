"""Multi-task baselines (shared-bottom, MMoE, PLE) plug into the trainer unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.trainer.frames import tiny_frame
from trainer.baselines import BASELINE_ARCHS, MMoEArch, PLEArch
from trainer.batches import build_input_spec, encode_split, iterate_batches, task_names_of
from trainer.config import ModelConfig, TrainConfig
from trainer.dense import DenseArch
from trainer.encoder import sequence_stats
from trainer.evaluate import task_metrics
from trainer.model import build_dense_arch, load_unsharded
from trainer.run_dir import FINAL_CHECKPOINT
from trainer.train import train


@pytest.fixture(scope="module")
def frame():
    return tiny_frame(600, seed=2)


def _cfg(frame, arch: str) -> ModelConfig:
    spec = build_input_spec(frame, ("age_bucket", "region"), sequence_length=12)
    return ModelConfig(input_spec=spec, task_names=task_names_of(frame), dense_arch=arch)


def _inputs(cfg: ModelConfig, b: int = 5, empty_rows: int = 2):
    torch.manual_seed(0)
    spec = cfg.input_spec
    d, length = cfg.embedding_dim, spec.sequence_length
    seq = {f.name: torch.randn(b, length, d) for f in spec.sequence_features}
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[:empty_rows] = False  # users with no history
    ids = [torch.randint(1, 5, (b, length)) * mask for _ in spec.sequence_features]
    return (
        seq,
        mask,
        torch.randn(b, len(spec.profile_features), d),
        sequence_stats(ids, mask, length),
        torch.rand(b, spec.long_term_width),  # the encoded long-term features
    )


@pytest.mark.parametrize("arch", BASELINE_ARCHS)
def test_baseline_gives_dense_arch_outputs_and_finite_vectors_for_empty_histories(
    frame, arch: str
) -> None:
    cfg = _cfg(frame, arch)
    dense = build_dense_arch(cfg).eval()
    out = dense(*_inputs(cfg))
    assert out.task_logits.shape == (5, len(cfg.task_names))
    assert out.user_vector.shape == (5, cfg.user_dim)
    assert torch.isfinite(out.user_vector).all() and torch.isfinite(out.task_logits).all()
    assert torch.allclose(out.user_vector.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert out.balance_loss.item() == 0.0 and out.router_stats == []


def test_dense_arch_name_selects_the_architecture(frame) -> None:
    assert isinstance(build_dense_arch(_cfg(frame, "supermoe")), DenseArch)
    assert isinstance(build_dense_arch(_cfg(frame, "mmoe")), MMoEArch)
    assert isinstance(build_dense_arch(_cfg(frame, "ple")), PLEArch)
    with pytest.raises(ValueError, match="dense_arch"):
        build_dense_arch(_cfg(frame, "transformer-xl"))


def test_mmoe_task_gates_route_tasks_differently_after_training(frame, tmp_path: Path) -> None:
    cfg = _cfg(frame, "mmoe")
    train(TrainConfig(str(tmp_path), cfg, max_steps=40, batch_size=64, plots=False), frame)
    model = load_unsharded(tmp_path / FINAL_CHECKPOINT)
    dense = model.dense_arch
    assert isinstance(dense, MMoEArch)
    x = dense.inputs(*_inputs(cfg, b=32, empty_rows=0))
    gates = [torch.softmax(g(x), dim=-1) for g in dense.gates]  # T x (B, E)
    assert not torch.allclose(gates[0], gates[1], atol=1e-3)


@pytest.mark.parametrize("arch", BASELINE_ARCHS)
def test_trainer_trains_baseline_and_reloads_it_with_identical_outputs(
    frame, arch: str, tmp_path: Path
) -> None:
    cfg = _cfg(frame, arch)
    result = train(
        TrainConfig(str(tmp_path), cfg, max_steps=60, batch_size=64, eval_every=30, plots=False),
        frame,
    )
    # Planted structure (tests/trainer/frames.py): a trained baseline beats chance on each task.
    assert all(auc > 0.6 for auc in result.test_auc.values()), result.test_auc
    model = load_unsharded(tmp_path / FINAL_CHECKPOINT)
    assert model.cfg.dense_arch == arch
    # The saved model is the one the trainer scored: re-scoring it gives the same test AUC.
    test = frame[frame["split"] == "test"]
    split = encode_split(test, cfg.input_spec, cfg.task_names)
    with torch.no_grad():
        probs = [
            torch.sigmoid(
                model(b.seq_kjt, b.profile_kjt, None, long_term=b.long_term)[0].task_logits
            ).numpy()
            for b in iterate_batches(split, cfg.input_spec, 64)
        ]
    again = task_metrics(np.concatenate(probs), split.labels, cfg.task_names)
    for t, auc in result.test_auc.items():
        assert again[t]["auc"] == pytest.approx(auc, abs=1e-6)
