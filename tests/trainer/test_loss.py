"""The task-indicator loss: per-task means over labelled samples, no gradient from absent tasks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.evaluate import validation_score
from trainer.loss import TaskLoss, labelled_weights, per_task_losses

NAN = float("nan")


def test_task_without_labels_in_batch_contributes_exactly_zero_gradient() -> None:
    logits = torch.randn(6, 2, requires_grad=True)
    labels = torch.tensor([[1.0, NAN], [0.0, NAN], [1.0, NAN], [0.0, NAN], [1.0, NAN], [1, NAN]])
    out = TaskLoss(2)(logits, labels)
    out.total.backward()
    assert logits.grad is not None
    assert out.per_task[1].item() == 0.0
    assert torch.all(logits.grad[:, 1] == 0.0)  # exactly zero, not just small
    assert torch.all(logits.grad[:, 0] != 0.0)


def test_uncertainty_weighting_gives_zero_gradient_to_absent_task() -> None:
    loss = TaskLoss(2, weighting="uncertainty")
    logits = torch.randn(4, 2, requires_grad=True)
    labels = torch.tensor([[1.0, NAN], [0.0, NAN], [1.0, NAN], [0.0, NAN]])
    loss(logits, labels).total.backward()
    assert loss.log_vars is not None and loss.log_vars.grad is not None
    assert loss.log_vars.grad[1].item() == 0.0 and torch.all(logits.grad[:, 1] == 0.0)


def test_indicator_loss_averages_each_task_over_its_own_labelled_samples() -> None:
    logits = torch.tensor([[0.5, 2.0], [-1.0, -3.0], [0.0, 1.0], [2.0, 0.0]])
    labels = torch.tensor([[1.0, 1.0], [0.0, NAN], [1.0, NAN], [0.0, NAN]])
    per_task, counts = per_task_losses(logits, labels, "indicator")
    assert counts.tolist() == [4.0, 1.0]
    expected_t1 = F.binary_cross_entropy_with_logits(torch.tensor(2.0), torch.tensor(1.0))
    assert math.isclose(per_task[1].item(), expected_t1.item(), rel_tol=1e-6)
    # The plain loss counts unlabelled samples as negatives over the whole batch.
    plain, _ = per_task_losses(logits, labels, "plain")
    expected_plain = F.binary_cross_entropy_with_logits(
        logits[:, 1], torch.tensor([1.0, 0.0, 0.0, 0.0])
    )
    assert math.isclose(plain[1].item(), expected_plain.item(), rel_tol=1e-6)


def test_fixed_task_weights_scale_each_task() -> None:
    logits = torch.zeros(2, 2)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    total = TaskLoss(2, weights=(1.0, 3.0))(logits, labels).total
    assert math.isclose(total.item(), 4 * math.log(2), rel_tol=1e-6)


def test_labelled_weights_follow_each_tasks_labelled_share() -> None:
    labels = np.array([[1.0, NAN, 0.0], [0.0, NAN, NAN], [1.0, 1.0, NAN], [0.0, NAN, NAN]])
    assert labelled_weights(labels) == (1.0, 0.25, 0.25)
    assert labelled_weights(np.full((3, 2), NAN)) == (1.0, 1.0)  # nothing labelled: no weighting


def test_validation_score_weights_auc_like_the_loss() -> None:
    metrics = {"a": {"auc": 0.8}, "b": {"auc": 0.5}, "c": {"auc": NAN}}
    tasks = ("a", "b", "c")
    assert math.isclose(validation_score(metrics, tasks, np.ones(3)), 0.65)  # plain mean
    # 'b' labelled on a quarter of the rows: a quarter of the say in model choice
    score = validation_score(metrics, tasks, np.array([1.0, 0.25, 0.25]))
    assert math.isclose(score, (0.8 + 0.25 * 0.5) / 1.25)
    assert TaskLoss(3, weighting="uncertainty").selection_weights().tolist() == [1.0, 1.0, 1.0]
    assert TaskLoss(2, "indicator", "labelled", (1.0, 0.5)).selection_weights().tolist() == [
        1.0,
        0.5,
    ]


def test_train_config_refuses_unknown_or_conflicting_weighting(tmp_path) -> None:
    from trainer.config import ModelConfig, TrainConfig
    from userembed.errors import InvalidInputError
    from userembed.features import InputSpec

    model = ModelConfig(input_spec=InputSpec(), task_names=("a", "b"))
    with pytest.raises(InvalidInputError, match="expected fixed, labelled, uncertainty"):
        TrainConfig(str(tmp_path), model, task_weighting="labeled")
    with pytest.raises(InvalidInputError, match="cannot go with"):
        TrainConfig(str(tmp_path), model, task_weighting="labelled", task_weights=(1.0, 2.0))
    with pytest.raises(InvalidInputError, match="indicator or plain"):
        TrainConfig(str(tmp_path), model, loss="sum")
