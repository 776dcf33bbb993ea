"""The quality benchmark's inputs (bench/quality.py): its config (QualityConfig), the training
frame (bench/pit_join.py over the point-in-time feature tables) and each benchmarked model's
configs."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class QualityConfig:
    """One benchmark run: data sizes, the shared training budget and the model shape."""

    datasets: tuple[str, ...] = ("synthetic", "movielens")
    seeds: int = 3
    users: int = 20_000  # synthetic only; MovieLens-100K has 943
    data_seed: int = 0
    steps: int = 300
    batch_size: int = 256
    eval_every: int = 50
    patience: int = 3
    lr: float = 2e-3
    sequence_length: int = 50
    embedding_dim: int = 32
    num_layers: int = 2
    user_dim: int = 64
    val_users: int = 3_000  # validation rows kept (fixed sample): evaluation is most of a run
    threads: int = 1  # on a shared 2-core machine 2 torch threads ran up to 10x slower than 1
    distill_teachers: int = 3  # single-task teachers per task of the distilled model
    smoke: bool = False


# --- data --------------------------------------------------------------------------------------


def load_frame(name: str, qc: QualityConfig, workdir: Path) -> tuple[pd.DataFrame, Any]:
    """Data set name -> (training frame, DatasetSpec)."""
    from bench.pit_join import merge_asof_frame
    from userembed.future_targets import add_future_targets
    from userembed.snapshots import write_feature_tables

    if name == "synthetic":
        from userembed.datasets.synthetic import generate_synthetic

        events, users, labels, spec = generate_synthetic(qc.users, seed=qc.data_seed)
    elif name == "movielens":
        from userembed.datasets.movielens import load_movielens

        events, users, labels, spec = load_movielens()
    else:
        raise ValueError(f"unknown data set {name!r}")
    labels, spec = add_future_targets(events, labels, spec)  # as `data build` writes them
    offline = workdir / f"offline-{name}"
    write_feature_tables(events, users, spec, offline, qc.sequence_length)
    # The merge_asof reference gives the offline stores' frame (tests/userembed/test_feast_repo.py)
    # with no registry or Redis.
    frame = merge_asof_frame(offline, labels, spec)
    if qc.smoke:  # keep every split, a few hundred rows each
        frame = frame.groupby("split", group_keys=False).head(300).reset_index(drop=True)
    val = frame.index[frame["split"] == "validation"]
    if len(val) > qc.val_users:  # same fixed sample for every model
        drop = np.random.default_rng(qc.data_seed).permutation(val)[qc.val_users :]
        frame = frame.drop(index=drop).reset_index(drop=True)
    return frame, spec


# --- models ------------------------------------------------------------------------------------


def model_config(name: str, frame: pd.DataFrame, spec: Any, qc: QualityConfig) -> Any:
    """Benchmark model name -> trainer ModelConfig (tasks, arch, MoE on/off)."""
    from trainer.batches import build_input_spec
    from trainer.config import ModelConfig, MoEConfig

    input_spec = build_input_spec(frame, spec.model_profile_features, qc.sequence_length)
    tasks = tuple(spec.tasks)
    moe = MoEConfig()
    arch = "supermoe"
    if name.startswith("single:"):
        tasks = (name.split(":", 1)[1],)
    elif name == "dense_transformer":
        # No block is MoE (block i is MoE iff i % moe_every == moe_every - 1); the dense FFN
        # is k experts wide, so active FFN compute per token equals SUPERMOE's top-k.
        moe = replace(
            moe,
            moe_every=qc.num_layers + 1,
            expert_hidden=moe.expert_hidden * moe.num_experts_per_tok,
        )
    elif name in ("shared_bottom", "mmoe", "ple"):
        arch = name
    elif name not in ("supermoe", "supermoe_plain", "supermoe_labelled", "supermoe_distilled"):
        raise ValueError(f"unknown model {name!r}")
    return ModelConfig(
        input_spec=input_spec,
        task_names=tasks,
        embedding_dim=qc.embedding_dim,
        num_layers=qc.num_layers,
        user_dim=qc.user_dim,
        moe=moe,
        dense_arch=arch,
    )


def train_config(
    name: str,
    mcfg: Any,
    seed: int,
    run_dir: Path,
    qc: QualityConfig,
    teachers: dict[str, tuple[str, ...]] | None = None,
) -> Any:
    from trainer.config import TrainConfig

    return TrainConfig(
        run_dir=str(run_dir),
        model=mcfg,
        seed=seed,
        batch_size=qc.batch_size,
        max_steps=qc.steps,
        eval_every=qc.eval_every,
        checkpoint_every=qc.steps,
        patience=qc.patience,
        lr=qc.lr,
        warmup_steps=min(50, max(1, qc.steps // 10)),
        loss="plain" if name == "supermoe_plain" else "indicator",
        task_weighting="labelled" if name == "supermoe_labelled" else "fixed",
        teachers=teachers,
        plots=False,
        log_every=max(10, qc.steps // 5),
    )


def user_vectors(run_dir: Path, part: pd.DataFrame, batch_size: int = 1024) -> np.ndarray:
    """Frozen user vectors (N, V) of `part` from the run's final model (eval mode)."""
    from trainer.evaluate import score_rows
    from trainer.model import load_unsharded
    from trainer.run_dir import RunDir

    vectors, _ = score_rows(load_unsharded(RunDir(run_dir).model), part, batch_size)
    return vectors
