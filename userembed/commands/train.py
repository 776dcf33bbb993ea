"""`userembed train` (and, from trainer/export/'s side, `userembed export`).

`register(subparsers)` adds every trainer subcommand; add new ones as another `_add_<name>`
function called from it. Heavy imports (torch, torchrec, feast) stay inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trainer.config import (  # light: no torch
    DEFAULT_EPOCHS,
    MAX_EVAL_EVERY,
    TrainConfig,
    check_loss_options,
)
from userembed import paths, prerequisites
from userembed.commands.logs import quiet_libraries
from userembed.errors import DataNotFoundError, InvalidInputError
from userembed.registry import DEFAULT_MODEL, LATEST

logger = logging.getLogger(__name__)

# CLI flag -> config field (TrainConfig / ModelConfig / MoEConfig); None values are not passed.
_OPTIONS: dict[str, tuple[type, str]] = {
    "epochs": (
        float,
        f"passes over the training rows (default {DEFAULT_EPOCHS:g}): max_steps = ceil(epochs x "
        "training rows / (batch size x processes)); early stopping usually ends the run sooner",
    ),
    "max_steps": (int, "training steps; given, it wins over --epochs"),
    "batch_size": (int, "samples per step per process"),
    "eval_every": (
        int,
        f"steps between validation scores (default: one epoch, at most {MAX_EVAL_EVERY} steps)",
    ),
    "checkpoint_every": (int, "steps between checkpoints"),
    "patience": (int, "evaluations without gain before early stop (0 = off)"),
    "min_steps": (
        int,
        "steps before a validation score may pick the model or stop the run (default 4 x "
        "warmup_steps)",
    ),
    "lr": (float, "AdamW learning rate (dense parameters)"),
    "sparse_lr": (float, "Adagrad learning rate (embedding tables)"),
    "seed": (int, "random seed"),
    "loss": (str, "indicator (default) or plain"),
    "task_weighting": (str, "fixed (default), labelled or uncertainty"),
    "distill_label_share": (
        float,
        "with teachers: the label's share of a labelled row's target at the last step "
        "(0 = the teacher's all run, the default; 1 = BAM! annealing to the labels)",
    ),
    "distill_teachers": (
        int,
        "with --distill: single-task teachers per task, at seeds seed, seed+1, ... (default 3); "
        "the target is their mean",
    ),
    "future_loss_weight": (
        float,
        "weight of the self-supervised objective (the user vector predicts the user's next "
        "items and categories; default 1, 0 = off; the whole objective without tasks)",
    ),
    "future_window_seconds": (int, "future window of its targets (default: the data set's)"),
    "future_targets": (int, "its targets per row and kind (default 16)"),
    "future_temperature": (float, "its softmax temperature (default 0.1)"),
    "summary_loss_weight": (
        float,
        "weight of the whole-history objective (a linear read-out of the user vector rebuilds "
        f"the user's long-term features; default {TrainConfig.summary_loss_weight:g}, 0 = off)",
    ),
    "summary_min_scale": (
        float,
        "least spread its target columns are standardised by (default "
        f"{TrainConfig.summary_min_scale:g}: a rare genre's share counts in full)",
    ),
    "embedding_dim": (int, "table and transformer width D"),
    "num_layers": (int, "transformer blocks"),
    "user_dim": (int, "universal user vector size"),
    "num_experts": (int, "experts per MoE layer"),
    "num_experts_per_tok": (int, "top-k routing: 1 or 2"),
    "expert_hidden": (int, "expert FFN width"),
    "moe_every": (int, "1 = every block MoE, 2 = alternate dense/MoE"),
}


def _teachers(specs: list[str]) -> dict[str, tuple[str, ...]]:
    """--teacher TASK=RUN (a run id under $USEREMBED_HOME/runs, or a run dir) -> task -> dirs
    (a task named again adds a teacher: the target is their mean); checked here, before the
    training frame is built."""
    from trainer.run_dir import RunDir

    out: dict[str, tuple[str, ...]] = {}
    for item in specs:
        task, sep, run = item.partition("=")
        if not sep or not task or not run:
            raise InvalidInputError(f"--teacher {item!r}: expected TASK=RUN")
        path = Path(run) if os.sep in run else paths.runs_dir() / run
        if not RunDir(path).model.is_file():
            raise InvalidInputError(f"--teacher {item!r}: no trained model at {path}")
        if str(path) in out.get(task, ()):
            raise InvalidInputError(f"--teacher {item!r}: the same teacher twice for {task!r}")
        out[task] = (*out.get(task, ()), str(path))
    return out


def _tasks(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    tasks = tuple(t.strip() for t in value.split(",") if t.strip())
    if not tasks:
        raise InvalidInputError("--tasks: name at least one task")
    return tasks


def _spawn_torchrun(args: argparse.Namespace, run_id: str) -> int:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    argv = [torchrun, "--standalone", f"--nproc_per_node={args.nproc}", "-m", "userembed.commands"]
    argv += ["train", "--run-id", run_id]
    if args.resume:
        argv.append("--resume")
    for name in _OPTIONS:
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    if args.tasks is not None:
        argv += ["--tasks", args.tasks]
    for item in args.teacher:
        argv += ["--teacher", item]
    if args.distill:
        argv.append("--distill")
    logger.info("launching %s", " ".join(argv))
    return subprocess.call(argv)


def _train(args: argparse.Namespace) -> int:
    if args.resume and not args.run_id:
        raise InvalidInputError("--resume needs --run-id of the run to continue")
    options: dict[str, Any] = {
        name: getattr(args, name) for name in _OPTIONS if getattr(args, name) is not None
    }
    flags = [*options, *(n for n in ("tasks", "teacher", "distill") if getattr(args, n))]
    if args.resume and flags:
        # A resumed run must reach the result of the uninterrupted one: its saved config wins.
        given = ", ".join(f"--{n.replace('_', '-')}" for n in flags)
        raise InvalidInputError(
            f"--resume continues run {args.run_id} with its saved config (train_config.json); "
            f"{given} would be ignored: drop them, or start a new run"
        )
    tasks = _tasks(args.tasks)
    if args.distill and args.teacher:
        raise InvalidInputError("--distill trains the run's own teachers: drop --teacher")
    if args.distill_teachers is not None and not args.distill:
        raise InvalidInputError("--distill-teachers is the number --distill trains: add --distill")
    if args.teacher:
        options["teachers"] = _teachers(args.teacher)
    # Option errors first, then what the training frame reads: the labels and spec, and
    # Feast's views over the offline tables (both before torch and Feast are imported).
    check_loss_options(
        options.get("loss", TrainConfig.loss),
        options.get("task_weighting", TrainConfig.task_weighting),
        None,
    )
    prerequisites.require_data_set()
    prerequisites.require_feast_registry()
    run_id = args.run_id or datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _spawn_torchrun(args, run_id)
    quiet_libraries()
    from trainer.feast_run import train_from_feast

    result = train_from_feast(
        paths.runs_dir() / run_id,
        resume=args.resume,
        tasks=tasks,
        distill=args.distill,
        **options,
    )
    if result.report:  # rank 0
        aucs = {t: m["auc"] for t, m in result.test_metrics.items()}
        # the self-supervised objective's in-batch AUC per target kind (the figure of a run
        # without tasks)
        aucs |= {k: m["auc"] for k, m in result.report.get("future_test", {}).items()}
        figures = " ".join(f"{t}={v:.4f}" for t, v in aucs.items())
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
    for name, (typ, help_text) in _OPTIONS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=typ, help=help_text)
    p.add_argument(
        "--tasks",
        help="comma list: train only these of the data set's tasks (a one-task run can be "
        "another run's --teacher)",
    )
    p.add_argument(
        "--teacher",
        action="append",
        default=[],
        metavar="TASK=RUN",
        help="distil TASK from a trained run (run id or dir); repeatable, also for one task "
        "(the target is the teachers' mean; docs/model.md)",
    )
    p.add_argument(
        "--distill",
        action="store_true",
        help="first train single-task teachers (--distill-teachers per task, under "
        "<run>/teachers/), then distil the model from them",
    )
    p.set_defaults(func=_train)


def _add_export(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a trained run to ONNX, check parity, publish to the model registry",
    )
    p.add_argument("--run", required=True, help="run dir holding model.pt (or the model.pt)")
    p.add_argument("--model-name", default=DEFAULT_MODEL, help="registry model name")
    p.add_argument("--registry-root", default=None, help="default: $USEREMBED_REGISTRY_ROOT")
    p.add_argument("--fp16", action="store_true", help="add an fp16 variant (cosine >= 0.999)")
    p.add_argument("--int8", action="store_true", help="add an int8 dynamic-quantised variant")
    p.add_argument(
        "--external-data-threshold-mb",
        type=float,
        help="store tensors as ONNX external data when the weights exceed this many MB "
        "(default: the exporter's, below protobuf's 2 GB limit)",
    )
    p.add_argument(
        "--heldout",
        default=None,
        help="held-out rows for parity: .npz of encoded inputs or a training-frame .parquet "
        "(default: <run>/heldout_inputs.npz, else random rows)",
    )
    p.add_argument(
        "--max-abs-diff", type=float, help="parity bar on the user vector (default: the exporter's)"
    )
    p.add_argument(
        "--alias",
        action="append",
        default=[],
        help="also point this alias (e.g. prod) at the new version; repeatable",
    )
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from trainer.run_dir import RunDir

    run = Path(args.run)  # a run folder, or its model file (as trainer.export reads it)
    if not (RunDir(run).model if run.is_dir() else run).is_file():
        raise DataNotFoundError(
            prerequisites.run_first(f"no trained model at {run}", prerequisites.TRAIN)
        )
    quiet_libraries()
    from trainer.export import export_model
    from trainer.export.parity import FP32_CASES

    variants = ("fp32",) + (("fp16",) if args.fp16 else ()) + (("int8",) if args.int8 else ())
    result = export_model(
        args.run,
        args.registry_root,
        args.model_name,
        variants,
        heldout=args.heldout,
        aliases=(LATEST, *args.alias),
        # Only the flags given: the defaults are the exporter's, spelled once there.
        **{
            name: value
            for name in ("external_data_threshold_mb", "max_abs_diff")
            if (value := getattr(args, name)) is not None
        },
    )
    fp32 = result.parity["fp32"]
    print(f"published {result.manifest.model_name}/{result.version} to {result.registry_root}")
    for case in FP32_CASES:
        ties = fp32[case]["near_tie_rows"]
        left_out = (
            f" ({ties} of {fp32[case]['rows']} rows on a routing tie left out)" if ties else ""
        )
        print(
            f"  fp32 {case}: max |onnxruntime - torch|"
            f" {fp32[case]['user_vector_max_abs_diff']:.2e}{left_out}"
        )
    print(f"  torchrec vs exported encoder: {fp32['torchrec_vs_export_max_abs_diff']:.2e}")
    for name in variants[1:]:
        print(f"  {name}: min cosine to fp32 {result.parity[name]['cosine_to_fp32_min']:.6f}")
    summary = {
        "model": result.manifest.model_name,
        "version": result.version,
        "variants": list(variants),
        "user_vector_max_abs_diff": max(
            fp32[c]["user_vector_max_abs_diff"] for c in ("heldout", "crafted", "batch1")
        ),
    }
    print(json.dumps(summary))  # last line: one JSON object, for scripts
    return 0


def register(subparsers: Any) -> None:
    _add_train(subparsers)
    _add_export(subparsers)
