"""A run's report: `report.json` (test metrics, expert load, history, config) and the plots
(loss curves, per-task AUC, expert load), written into the run folder (trainer/run_dir.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from trainer.config import TrainConfig
from trainer.run_dir import RunDir

logger = logging.getLogger(__name__)


def write_report(
    run_dir: Path,
    cfg: TrainConfig,
    test_metrics: dict[str, dict[str, float]],
    history: dict[str, list[dict[str, Any]]],
    expert_load: list[np.ndarray],
    train_dropped: list[float],
    steps: int,
    best_step: int,
    stopped_early: bool,
    future_test: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """future_test: the self-supervised objective on the test split, per target kind (in-batch
    AUC, loss, rows with a target); None when it is off."""
    report: dict[str, Any] = {
        "run_dir": str(run_dir),
        "steps": steps,
        "best_step": best_step,
        "stopped_early": stopped_early,
        "test": test_metrics,
        "expert_load": [
            {
                "layer": i,
                "token_share": [float(x) for x in load],
                "train_dropped_share": float(train_dropped[i]) if i < len(train_dropped) else 0.0,
            }
            for i, load in enumerate(expert_load)
        ],
        "history": history,
        "config": cfg.to_dict(),
    }
    if future_test is not None:
        report["future_test"] = future_test
    run = RunDir(run_dir)
    run.report.write_text(json.dumps(report, indent=2))
    if cfg.plots:
        _plots(run, test_metrics, history, expert_load)
    return report


def _plots(
    run: RunDir,
    test_metrics: dict[str, dict[str, float]],
    history: dict[str, list[dict[str, Any]]],
    expert_load: list[np.ndarray],
) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    tasks = list(test_metrics)
    fig, ax = plt.subplots(figsize=(6, 4))
    train = history["train"]
    for t in tasks:
        ax.plot([h["step"] for h in train], [h["loss"][t] for h in train], label=t)
    ax.set(xlabel="step", ylabel="train loss (labelled samples)", title="Loss")
    kinds = list(train[0].get("future_loss", {})) if train else []
    if kinds:  # the self-supervised loss has another scale (a softmax over many targets)
        ax2 = ax.twinx()
        for kind in kinds:
            steps = [h["step"] for h in train]
            ax2.plot(steps, [h["future_loss"][kind] for h in train], ls=":", label=kind)
        ax2.set(ylabel="future loss (dotted)")
        ax2.legend(loc="upper center")
    if tasks:
        ax.legend()
    fig.savefig(run.plot("loss.png"), dpi=80, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    val = history["validation"]
    for t in tasks:
        (line,) = ax.plot([h["step"] for h in val], [h["auc"][t] for h in val], label=f"{t} val")
        ax.axhline(test_metrics[t]["auc"], color=line.get_color(), ls="--", lw=0.8)
    for kind in val[0].get("future", {}) if val else []:  # in-batch AUC of the future targets
        ax.plot(
            [h["step"] for h in val], [h["future"][kind]["auc"] for h in val], ls=":", label=kind
        )
    ax.set(xlabel="step", ylabel="AUC", title="Per-task AUC (dashed: test, best model)")
    ax.legend()
    fig.savefig(run.plot("auc.png"), dpi=80, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(1, len(expert_load))
    for i, load in enumerate(expert_load):
        ax.bar(np.arange(len(load)) + i * width, load, width, label=f"MoE layer {i}")
    if expert_load:
        ax.axhline(1.0 / len(expert_load[0]), color="grey", ls="--", lw=0.8)
    ax.set(xlabel="expert", ylabel="token share (test)", title="Expert load")
    ax.legend()
    fig.savefig(run.plot("expert_load.png"), dpi=80, bbox_inches="tight")
    plt.close(fig)
