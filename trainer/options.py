"""A TrainConfig from flat options (`userembed train` flags, benchmark settings), sized from
the training frame. Options name TrainConfig, ModelConfig or MoEConfig fields; defaults are
the configs' own (trainer/config.py)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pandas as pd

from trainer.batches import DEFAULT_TABLE_CAP, build_input_spec
from trainer.config import ModelConfig, MoEConfig, TrainConfig, check_loss_options
from userembed.errors import InvalidInputError
from userembed.features import DEFAULT_SEQUENCE_LENGTH
from userembed.items import ItemAttributeMap

MODEL_OPTIONS = {f.name for f in fields(ModelConfig)} - {"input_spec", "task_names", "moe"}
MOE_OPTIONS = {f.name for f in fields(MoEConfig)}
TRAIN_OPTIONS = {f.name for f in fields(TrainConfig)} - {"run_dir", "model"}


def check_options(options: dict[str, Any]) -> None:
    """Refuse unknown option names and loss settings TrainConfig would refuse, before the
    training frame is built (a minute or more)."""
    unknown = set(options) - TRAIN_OPTIONS - MODEL_OPTIONS - MOE_OPTIONS
    if unknown:
        raise InvalidInputError(f"unknown training options: {sorted(unknown)}")
    check_loss_options(
        options.get("loss", "indicator"),
        options.get("task_weighting", "fixed"),
        options.get("task_weights"),
    )


def config_for(
    frame: pd.DataFrame,
    tasks: tuple[str, ...],
    profile_features: tuple[str, ...],
    run_dir: str | Path,
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
    table_cap: int = DEFAULT_TABLE_CAP,
    items: ItemAttributeMap | None = None,
    **options: Any,
) -> TrainConfig:
    """A TrainConfig with tables sized from `frame` (and `items`, the item attribute map, when
    the data set has one); unknown option names are refused."""
    check_options(options)
    spec = build_input_spec(frame, profile_features, sequence_length, table_cap, items=items)
    model_kw = {k: options.pop(k) for k in list(options) if k in MODEL_OPTIONS}
    moe_kw = {k: options.pop(k) for k in list(options) if k in MOE_OPTIONS}
    model = ModelConfig(input_spec=spec, task_names=tasks, moe=MoEConfig(**moe_kw), **model_kw)
    return TrainConfig(run_dir=str(run_dir), model=model, **options)
