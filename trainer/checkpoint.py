"""Resume state of a training run: each rank's checkpoint under <run>/checkpoints/.

A checkpoint holds the model, the dense and sparse optimiser state, the schedule, the torch
RNG and the loop's state (step, epoch, position in the epoch, best model so far, history,
config). Batch order is a function of (seed, epoch), so a resumed run reaches the same
result as an uninterrupted one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.distributed import DistContext, unwrap
from trainer.run_dir import RunDir
from trainer.step import Optimizers
from userembed.errors import InvalidInputError

logger = logging.getLogger(__name__)


def sparse_optimizers(model: nn.Module, ctx: DistContext) -> list[Any]:
    """The tables' in-backward optimisers: DMP's fused one when sharded, else one per table."""
    if ctx.sharded:
        return [model.fused_optimizer]  # type: ignore[attr-defined]
    sparse = unwrap(model).sparse_arch
    return [o for p in sparse.parameters() for o in getattr(p, "_in_backward_optimizers", [])]


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether a run has trained steps to resume (rank 0's checkpoint; every rank has its own)."""
    return RunDir(run_dir).checkpoint(DistContext().rank).exists()


def save_checkpoint(
    path: Path, model: nn.Module, optim: Optimizers, ctx: DistContext, state: dict[str, Any]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "model": model.state_dict(),
        "dense_optimizer": optim.dense.state_dict(),
        "sparse_optimizers": [o.state_dict() for o in sparse_optimizers(model, ctx)],
        "scheduler": optim.scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        **state,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)  # atomic: a kill mid-write leaves the previous checkpoint intact
    logger.info("checkpoint step %d -> %s", state["step"], path)


def load_checkpoint(
    path: Path, model: nn.Module, optim: Optimizers, ctx: DistContext, state: dict[str, Any]
) -> None:
    """Restore `model`, `optim` and the torch RNG, and update `state`'s keys, from `path`."""
    if not path.exists():
        raise InvalidInputError(f"--resume: no checkpoint at {path}")
    blob = torch.load(path, map_location=ctx.device, weights_only=False)
    model.load_state_dict(blob["model"])
    optim.dense.load_state_dict(blob["dense_optimizer"])
    for o, s in zip(sparse_optimizers(model, ctx), blob["sparse_optimizers"], strict=True):
        o.load_state_dict(s)
    optim.scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    state.update({k: blob[k] for k in state if k in blob})
    logger.info("resumed from %s at step %d", path, state["step"])
