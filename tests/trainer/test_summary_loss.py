"""The whole-history objective keeps the long-term summary linearly readable in the vector."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.trainer.dist_worker import tiny_config
from tests.trainer.frames import tiny_frame
from trainer.batches import encode_split
from trainer.dense import DenseArch
from trainer.encoder import LongTermNorm, fit_long_term_norms
from trainer.model import load_unsharded
from trainer.run_dir import RunDir
from trainer.summary_loss import SummaryLoss, summary_loss_of
from trainer.train import train
from userembed.errors import InvalidInputError


def _r2(x: np.ndarray, y: np.ndarray) -> float:
    """Share of y's variance a least-squares linear map of x (with intercept) explains."""
    a = np.hstack([x, np.ones((len(x), 1))])
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    resid = y - a @ coef
    return float(1.0 - resid.var(axis=0).sum() / y.var(axis=0).sum())


def test_the_vector_learns_to_carry_what_only_the_long_term_input_holds() -> None:
    """Sequences and profile are noise; the long-term input holds 4 latent factors. Trained on
    the objective alone, the vector goes from carrying none of them (the long-term columns
    start at zero weight) to a linear map recovering most of their variance."""
    frame = tiny_frame(64)
    cfg = tiny_config("/tmp/unused", frame).model
    spec = cfg.input_spec
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    b, length, d, h = 256, spec.sequence_length, cfg.embedding_dim, spec.long_term_width
    seq = {f.name: torch.randn(b, length, d, generator=g) for f in spec.sequence_features}
    mask = torch.ones(b, length, dtype=torch.bool)
    profile = torch.randn(b, len(spec.profile_features), d, generator=g)
    stats = torch.rand(b, 2 * len(seq), generator=g)
    latent = torch.randn(b, 4, generator=g)
    long_term = latent @ torch.randn(4, h, generator=g) + 0.05 * torch.randn(b, h, generator=g)
    dense = DenseArch(cfg).train()
    objective = SummaryLoss(cfg.user_dim, h, weight=1.0).train()
    params = [*dense.parameters(), *objective.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)

    def vector() -> np.ndarray:
        with torch.no_grad():
            return dense(seq, mask, profile, stats, long_term).user_vector.numpy()

    before = _r2(vector(), latent.numpy())
    for _ in range(150):
        loss = objective(dense(seq, mask, profile, stats, long_term).user_vector, long_term)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _r2(vector(), latent.numpy())
    assert before < 0.3 and after > 0.9, (before, after)


def test_the_objective_is_off_at_weight_zero_or_without_a_long_term_input(tmp_path: Path) -> None:
    frame = tiny_frame(64)
    cfg = tiny_config(str(tmp_path), frame)
    assert isinstance(summary_loss_of(cfg), SummaryLoss)
    assert summary_loss_of(cfg.with_(summary_loss_weight=0.0)) is None
    no_long_term = replace(cfg.model, input_spec=replace(cfg.model.input_spec, long_term=None))
    assert summary_loss_of(replace(cfg, model=no_long_term)) is None
    with pytest.raises(InvalidInputError, match="summary_loss_weight"):
        cfg.with_(summary_loss_weight=-1.0)
    with pytest.raises(InvalidInputError, match="summary_min_scale"):
        cfg.with_(summary_min_scale=0.0)


def test_a_run_logs_the_objective_beside_the_task_losses(tmp_path: Path) -> None:
    frame = tiny_frame(200)
    cfg = tiny_config(str(tmp_path / "run"), frame, max_steps=10, eval_every=10, log_every=5)
    result = train(cfg, frame)
    losses = [h["summary_loss"] for h in result.report["history"]["train"]]
    assert len(losses) == 2 and all(np.isfinite(v) and v > 0 for v in losses)


def test_a_rare_column_counts_in_the_objective_as_much_as_a_common_one(tmp_path: Path) -> None:
    """Statistics of the whole training split, at the objective's own floor: a category 1 user
    in 50 has (its share's spread ~0.03, under the encoder's floor of 0.1) is standardised to
    unit variance in the targets, as a team's StandardScaler would see it."""
    frame = tiny_frame(200)
    cfg = tiny_config(str(tmp_path / "run"), frame, max_steps=2, eval_every=2)
    objective = summary_loss_of(cfg)
    assert objective is not None
    g = torch.Generator().manual_seed(0)
    h = cfg.model.input_spec.long_term_width
    split = torch.rand(1000, h, generator=g)
    split[:, 0] = (torch.rand(1000, generator=g) < 0.02).float() * 0.2  # rare: spread ~0.03
    fit_long_term_norms(objective, split.numpy(), cfg.summary_min_scale)
    target = objective.norm(split)
    assert abs(float(target[:, 0].std(unbiased=False)) - 1.0) < 1e-3
    encoder = LongTermNorm(h)
    fit_long_term_norms(encoder, split.numpy(), LongTermNorm.MIN_SCALE)
    assert float(encoder(split)[:, 0].std(unbiased=False)) < 0.5  # the encoder's floor holds


def test_training_fixes_the_standardisation_from_the_training_split(tmp_path: Path) -> None:
    frame = tiny_frame(200)
    cfg = tiny_config(str(tmp_path / "run"), frame, max_steps=2, eval_every=2)
    result = train(cfg, frame)
    model = load_unsharded(RunDir(result.run_dir).model)
    norm = model.dense_arch.encoder.long_term_norm
    assert norm is not None and bool(norm.initialised)
    train_rows = frame[frame["split"] == "train"]
    spec = cfg.model.input_spec
    assert spec.long_term is not None
    long_term = encode_split(train_rows, spec, cfg.model.task_names).long_term
    assert long_term is not None
    # the split's mean, not a first batch's (the split holds more rows than a batch)
    assert len(train_rows) > cfg.batch_size
    torch.testing.assert_close(norm.center, torch.from_numpy(long_term.mean(axis=0)))
