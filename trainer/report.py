"""Evaluation report of a run: per-task test AUC / log-loss, expert load, curves.

Writes `report.json` and PNG plots (loss curves, per-task AUC, expert load) into the run dir.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

logger = logging.getLogger(__name__)

REPORT_FILE = "report.json"


def task_metrics(
    probs: np.ndarray, labels: np.ndarray, task_names: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Per task over its labelled rows: AUC, log-loss, and the prior's log-loss as baseline."""
    out: dict[str, dict[str, float]] = {}
    for j, t in enumerate(task_names):
        y = labels[:, j]
        keep = ~np.isnan(y)
        y, p = y[keep], np.clip(probs[keep, j], 1e-7, 1 - 1e-7)
        if len(y) == 0 or y.min() == y.max():
            out[t] = {
                "auc": float("nan"),
                "log_loss": float("nan"),
                "prior_log_loss": float("nan"),
                "n": float(len(y)),
            }
            continue
        prior = float(y.mean())
        out[t] = {
            "auc": float(roc_auc_score(y, p)),
            "log_loss": float(log_loss(y, p, labels=[0, 1])),
            "prior_log_loss": float(log_loss(y, np.full_like(p, prior), labels=[0, 1])),
            "n": float(len(y)),
        }
    return out


def write_report(
    run_dir: Path,
    cfg: Any,
    test_metrics: dict[str, dict[str, float]],
    history: dict[str, list[dict[str, Any]]],
    expert_load: list[np.ndarray],
    train_dropped: list[float],
    steps: int,
    best_step: int,
    stopped_early: bool,
) -> dict[str, Any]:
    report = {
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
    (run_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
    if cfg.plots:
        _plots(run_dir, test_metrics, history, expert_load)
    return report


def _plots(
    run_dir: Path,
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
    ax.legend()
    fig.savefig(run_dir / "loss.png", dpi=80, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    val = history["validation"]
    for t in tasks:
        (line,) = ax.plot([h["step"] for h in val], [h["auc"][t] for h in val], label=f"{t} val")
        ax.axhline(test_metrics[t]["auc"], color=line.get_color(), ls="--", lw=0.8)
    ax.set(xlabel="step", ylabel="AUC", title="Per-task AUC (dashed: test, best model)")
    ax.legend()
    fig.savefig(run_dir / "auc.png", dpi=80, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(1, len(expert_load))
    for i, load in enumerate(expert_load):
        ax.bar(np.arange(len(load)) + i * width, load, width, label=f"MoE layer {i}")
    if expert_load:
        ax.axhline(1.0 / len(expert_load[0]), color="grey", ls="--", lw=0.8)
    ax.set(xlabel="expert", ylabel="token share (test)", title="Expert load")
    ax.legend()
    fig.savefig(run_dir / "expert_load.png", dpi=80, bbox_inches="tight")
    plt.close(fig)
