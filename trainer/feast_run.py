"""`userembed train`'s run: the training frame of the last `userembed data build`, joined
point-in-time by Feast, a config from the options (or the saved one on resume), the run's own
teachers with `distill`, then the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.checkpoint import has_checkpoint
from trainer.distributed import init_distributed
from trainer.options import check_options, config_for
from trainer.run_dir import RunDir
from trainer.teachers import own_teachers, train_teachers
from trainer.train import TrainResult, train
from userembed import feast_ops
from userembed.dataset_build import load_built, load_built_items
from userembed.errors import InvalidInputError


def train_from_feast(
    run_dir: Path,
    resume: bool = False,
    tasks: tuple[str, ...] | None = None,
    distill: bool = False,
    **options: Any,
) -> TrainResult:
    """Train into `run_dir` on the built data set's Feast training frame.

    tasks: a subset of the data set's tasks (default all), e.g. a single-task teacher.
    distill: first train `distill_teachers` single-task teachers per task under
    <run_dir>/teachers/, then the model distilled from them; a resumed run finishes what was
    cut short. options: flat TrainConfig/ModelConfig/MoEConfig fields (trainer/options.py),
    refused when unknown before any data is read.
    """
    run = RunDir(run_dir)
    if not resume:
        check_options(options)
    labels, spec = load_built()
    if tasks is not None:
        unknown = [t for t in tasks if t not in spec.tasks]
        if unknown:
            raise InvalidInputError(
                f"unknown tasks {unknown}: this data set has {', '.join(spec.tasks)}"
            )
    store = feast_ops.open_store()
    frame = feast_ops.training_frame(store, labels, spec)
    # The data set's items table, when it has one; a resumed run keeps the map it started with.
    items = run.items() if resume else load_built_items()
    if resume:
        cfg = run.read_config()
    else:
        cfg = config_for(
            frame,
            tasks or tuple(spec.tasks),
            tuple(spec.model_profile_features),
            run_dir,
            sequence_length=spec.sequence_length,
            items=items,
            **options,
        )
        if distill:
            cfg = cfg.with_(teachers=own_teachers(cfg))
    own = bool(cfg.teachers) and cfg.teachers == own_teachers(cfg)
    if own:
        if init_distributed().is_main:  # the config a resume reads, before the teachers
            run.write_config(cfg)
        train_teachers(cfg, frame, items)
    # A distilled run cut short while training its teachers has no checkpoint of its own yet.
    return train(cfg, frame, resume=resume and (has_checkpoint(run_dir) or not own), items=items)
