"""`userembed train` (and, from trainer/export.py's side, `userembed export`).

`register(subparsers)` adds every trainer subcommand; add new ones as another `_add_<name>`
function called from it. Heavy imports (torch, torchrec, feast) stay inside the handlers.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from userembed import paths
from userembed.errors import InvalidInputError

logger = logging.getLogger(__name__)

# CLI flag -> config field (TrainConfig / ModelConfig / MoEConfig); None values are not passed.
_OPTIONS: dict[str, tuple[type, str]] = {
    "max_steps": (int, "training steps"),
    "batch_size": (int, "samples per step per process"),
    "eval_every": (int, "steps between validation evaluations"),
    "checkpoint_every": (int, "steps between checkpoints"),
    "patience": (int, "evaluations without gain before early stop (0 = off)"),
    "lr": (float, "AdamW learning rate (dense parameters)"),
    "sparse_lr": (float, "Adagrad learning rate (embedding tables)"),
    "seed": (int, "random seed"),
    "loss": (str, "indicator (default) or plain"),
    "task_weighting": (str, "fixed (default) or uncertainty"),
    "embedding_dim": (int, "table and transformer width D"),
    "num_layers": (int, "transformer blocks"),
    "user_dim": (int, "universal user vector size"),
    "num_experts": (int, "experts per MoE layer"),
    "num_experts_per_tok": (int, "top-k routing: 1 or 2"),
    "expert_hidden": (int, "expert FFN width"),
    "moe_every": (int, "1 = every block MoE, 2 = alternate dense/MoE"),
}


def runs_dir() -> Path:
    return paths.home() / "runs"


def _quiet_libraries() -> None:
    """torchrec and fbgemm log every table at INFO; keep the progress log readable."""
    logging.getLogger("torchrec").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda r: r.name != "root" or r.levelno >= logging.WARNING)


def _spawn_torchrun(args: argparse.Namespace, run_id: str) -> int:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    argv = [torchrun, "--standalone", f"--nproc_per_node={args.nproc}", "-m", "userembed.cli"]
    argv += ["train", "--run-id", run_id, "--engine", args.engine]
    if args.resume:
        argv.append("--resume")
    for name in _OPTIONS:
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    logger.info("launching %s", " ".join(argv))
    return subprocess.call(argv)


def _train(args: argparse.Namespace) -> int:
    run_id = args.run_id or datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _spawn_torchrun(args, run_id)
    if args.resume and not args.run_id:
        raise InvalidInputError("--resume needs --run-id of the run to continue")
    _quiet_libraries()
    from trainer.train import train_from_feast

    options: dict[str, Any] = {
        name: getattr(args, name) for name in _OPTIONS if getattr(args, name) is not None
    }
    result = train_from_feast(
        runs_dir() / run_id, resume=args.resume, engine=args.engine, **options
    )
    if result.test_metrics:  # rank 0
        figures = " ".join(f"{t}={m['auc']:.4f}" for t, m in result.test_metrics.items())
        print(f"run {run_id}: {result.steps} steps, test AUC {figures}, dir {result.run_dir}")
    return 0


def _add_train(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the SUPERMOE encoder on the built data set (Feast training frame)",
        description="Writes $USEREMBED_HOME/runs/<run id>/ (model.pt, report.json, plots).",
    )
    p.add_argument("--run-id", help="run folder name (default: UTC time)")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun, sharded tables)")
    p.add_argument("--resume", action="store_true", help="continue the run's last checkpoint")
    p.add_argument(
        "--engine",
        choices=("auto", "feast", "direct"),
        default="auto",
        help="training-frame join (see feast_ops.training_frame)",
    )
    for name, (typ, help_text) in _OPTIONS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=typ, help=help_text)
    p.set_defaults(func=_train)


def register(subparsers: Any) -> None:
    _add_train(subparsers)
