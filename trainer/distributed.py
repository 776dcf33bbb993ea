"""Process group and TorchRec sharding: DistributedModelParallel under torchrun.

A single process (no torchrun, or WORLD_SIZE=1) trains the unsharded model with the same
code. Under torchrun the tables are sharded by a plan from EmbeddingShardingPlanner:
EmbeddingCollection tables row-wise, EmbeddingBagCollection tables as the planner chooses
(on CPU it offers no row-wise for bags; if it cannot plan at all, a hand-built row-wise plan is
used, which runs correctly: shared/STACK.md). Dense parameters are data-parallel (DDP inside DMP).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainer.model import SuperMoEModel
from trainer.tables import table_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistContext:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    logger.info("rank %d/%d joined (%s, %s)", rank, world_size, backend, device)
    return DistContext(rank=rank, world_size=world_size, device=device)


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.sharded and dist.is_initialized():
        dist.destroy_process_group()


def _plan(model: SuperMoEModel, ctx: DistContext) -> Any:
    from torchrec.distributed.planner import (
        EmbeddingShardingPlanner,
        ParameterConstraints,
        Topology,
    )
    from torchrec.distributed.planner.types import PlannerError
    from torchrec.distributed.sharding_plan import (
        construct_module_sharding_plan,
        get_default_sharders,
        row_wise,
    )
    from torchrec.distributed.types import ShardingPlan, ShardingType

    spec = model.cfg.input_spec
    constraints = {
        table_name(f.name): ParameterConstraints(sharding_types=[ShardingType.ROW_WISE.value])
        for f in spec.sequence_features
    }
    # Bags: model-parallel only. Data-parallel would replicate the tables and bypass the fused
    # sparse optimizer; row-wise is not offered for bags on CPU (shared/STACK.md).
    for f in spec.profile_features:
        constraints[table_name(f.name)] = ParameterConstraints(
            sharding_types=[ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value]
        )
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=ctx.world_size, compute_device=ctx.device.type),
        constraints=constraints,
        debug=False,
    )
    pg = dist.GroupMember.WORLD
    assert pg is not None
    try:
        return planner.collective_plan(model, get_default_sharders(), pg)
    except PlannerError as e:
        logger.warning("planner offered no plan (%s); using a hand-built row-wise plan", e)
    plan = {
        "sparse_arch.ec": construct_module_sharding_plan(
            model.sparse_arch.ec,
            {table_name(f.name): row_wise() for f in spec.sequence_features},
            world_size=ctx.world_size,
            device_type=ctx.device.type,
        ),
    }
    if model.sparse_arch.ebc is not None:  # no profile features: no bag collection to shard
        plan["sparse_arch.ebc"] = construct_module_sharding_plan(
            model.sparse_arch.ebc,
            {table_name(f.name): row_wise() for f in spec.profile_features},
            world_size=ctx.world_size,
            device_type=ctx.device.type,
        )
    return ShardingPlan(plan=plan)


def shard_model(model: SuperMoEModel, ctx: DistContext) -> nn.Module:
    """Wrap in DistributedModelParallel; the in-backward sparse optimizer must be applied first."""
    from torchrec.distributed.model_parallel import (
        DefaultDataParallelWrapper,
        DistributedModelParallel,
    )

    plan = _plan(model, ctx)
    if ctx.is_main:
        for module_path, module_plan in plan.plan.items():
            for table, ps in module_plan.items():  # type: ignore[union-attr]
                logger.info(
                    "plan %s.%s: %s/%s ranks=%s",
                    module_path,
                    table,
                    ps.sharding_type,
                    ps.compute_kernel,
                    ps.ranks,
                )
    return DistributedModelParallel(
        model,
        device=ctx.device,
        plan=plan,
        # Every expert runs every step (possibly on 0 tokens), so all params get gradients.
        data_parallel_wrapper=DefaultDataParallelWrapper(static_graph=False),
    )


def unwrap(model: nn.Module) -> SuperMoEModel:
    """The SuperMoEModel inside DMP / DDP wrappers."""
    m: Any = model
    while not isinstance(m, SuperMoEModel):
        m = m.module
    return m


def gather_tables(model: nn.Module, ctx: DistContext) -> dict[str, Tensor] | None:
    """Full tables {t_<feature>: (N, D)}; on rank 0 when sharded (None on other ranks).

    Collective: every rank must call it.
    """
    inner = unwrap(model)
    if not ctx.sharded:
        return inner.table_weights()
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    state = model.state_dict()
    spec = inner.cfg.input_spec
    out: dict[str, Tensor] = {}
    names = [table_name(f.name) for f in spec.sequence_features + spec.profile_features]
    names += [table_name(a.input_name) for a in spec.item_attributes]
    for name in names:
        key = next(k for k in state if k.endswith(f".{name}.weight") and "sparse_arch" in k)
        t = state[key]
        if isinstance(t, ShardedTensor):
            full = torch.empty(t.size(), dtype=t.dtype) if ctx.is_main else None
            t.gather(dst=0, out=full)
            if ctx.is_main:
                assert full is not None
                out[name] = full.detach().cpu().clone()
        elif ctx.is_main:
            out[name] = t.detach().cpu().clone()
    return out if ctx.is_main else None


def dense_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """DenseArch state (replicated on every rank), CPU copies."""
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).dense_arch.state_dict().items()}


def broadcast_float(value: float, ctx: DistContext) -> float:
    """Rank 0's value on every rank (decisions that gate collectives must agree)."""
    if not ctx.sharded:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(t, src=0)
    return float(t.item())


def all_reduce_mean(values: Tensor, ctx: DistContext) -> Tensor:
    if ctx.sharded:
        values = values.clone()
        dist.all_reduce(values)
        values /= ctx.world_size
    return values
