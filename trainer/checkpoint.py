"""Resume state of a training run: each rank's checkpoint under <run>/checkpoints/.

A checkpoint holds the model, the dense and sparse optimiser state, the schedule, the torch
RNG and the loop's state (step, epoch, position in the epoch, best model so far, history,
config). Batch order is a function of (seed, epoch), so a resumed run reaches the same
result as an uninterrupted one.

The file holds tensors and plain data only, so it loads with `weights_only=True`
(trainer/tensor_file.py): a sharded table or optimiser state (a TorchRec ShardedTensor) is
saved as the list of this rank's local shard tensors and copied back into the live model's
shards on resume, which has the same plan (same world size and config).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from trainer.distributed import DistContext, unwrap
from trainer.run_dir import RunDir
from trainer.step import Optimizers
from trainer.tensor_file import load_tensor_file
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
        "model": _plain(model.state_dict()),
        "dense_optimizer": optim.dense.state_dict(),
        "sparse_optimizers": [_plain(o.state_dict()) for o in sparse_optimizers(model, ctx)],
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
    blob = load_tensor_file(path, ctx.device)
    model.load_state_dict(_restore(blob["model"], model.state_dict(), f"{path}: model"))
    optim.dense.load_state_dict(blob["dense_optimizer"])
    for o, s in zip(sparse_optimizers(model, ctx), blob["sparse_optimizers"], strict=True):
        o.load_state_dict(_restore(s, o.state_dict(), f"{path}: sparse optimiser"))
    optim.scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    state.update({k: blob[k] for k in state if k in blob})
    logger.info("resumed from %s at step %d", path, state["step"])


def _plain(obj: Any) -> Any:
    """`obj` with every ShardedTensor replaced by its local shard tensors (plain data)."""
    if isinstance(obj, ShardedTensor):
        return [shard.tensor for shard in obj.local_shards()]
    if isinstance(obj, dict):
        out = {k: _plain(v) for k, v in obj.items()}
        if all(out[k] is v for k, v in obj.items()):
            return obj
        plain = copy.copy(obj)  # keeps the type and a state dict's _metadata
        plain.update(out)
        return plain
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _restore(saved: Any, live: Any, where: str) -> Any:
    """`saved` (written by _plain) with each live ShardedTensor refilled from its saved local
    shards, ready for `load_state_dict`."""
    if isinstance(live, ShardedTensor):
        shards = live.local_shards()
        if not (
            isinstance(saved, list)
            and len(saved) == len(shards)
            and all(
                isinstance(t, torch.Tensor) and t.shape == s.tensor.shape
                for t, s in zip(saved, shards, strict=True)
            )
        ):
            raise InvalidInputError(
                f"{where}: the saved shards do not fit this run's sharding plan "
                "(resume with the world size and config that wrote the checkpoint)"
            )
        with torch.no_grad():
            for t, s in zip(saved, shards, strict=True):
                s.tensor.copy_(t)
        return live
    if isinstance(saved, dict) and isinstance(live, dict):
        restored = copy.copy(saved)
        restored.update({k: _restore(v, live.get(k), where) for k, v in saved.items()})
        return restored
    if isinstance(saved, list) and isinstance(live, list) and len(saved) == len(live):
        return [_restore(v, lv, where) for v, lv in zip(saved, live, strict=True)]
    return saved
