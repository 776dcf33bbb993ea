"""The Ray Data engine of the refresh: the same parts, computed by a pool of actors.

The driver (refresh/job.py) plans, checkpoints, validates and switches exactly as with the
local engine (refresh/worker.py `run_local`); only the part computation moves: a dataset of part
descriptors (`ray.data.from_items`, no read tasks) goes through `map_batches` with an actor
class holding ONE `PartWorker` (one onnxruntime session, one Redis connection) per actor.
Actors read their part of the parquet file themselves (the offline store must be reachable from
the workers: shared volume or object store mount) and write the vectors to Redis; only a small
result per part comes back to the driver, which checkpoints it.

Sizing on small machines (STACK.md): an actor pool that asks for every CPU leaves none for Ray's
own tasks and can hang, so actors ask for `ACTOR_CPUS` each and run onnxruntime on one thread.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from refresh.checkpoint import PartResult
from refresh.source import Part
from refresh.worker import PartJob, PartWorker

logger = logging.getLogger(__name__)

ACTOR_CPUS = 0.5


class PartActor:
    """Ray Data callable class: one PartWorker per actor, one part per row of the batch."""

    def __init__(self, job: PartJob) -> None:
        self.worker = PartWorker(job)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        out = []
        for i in range(len(batch["part"])):
            part = Part(
                id=str(batch["part"][i]),
                row_group=int(batch["row_group"][i]),
                index=int(batch["index"][i]),
                rows=np.frombuffer(batch["rows"][i], dtype=np.int64),
                changed=np.frombuffer(batch["changed"][i], dtype=bool),
            )
            out.append(self.worker.process(part).to_json())
        return {"result": out}


def part_items(parts: Sequence[Part]) -> list[dict[str, Any]]:
    """Part descriptors as dataset rows (row positions as bytes: compact, exact)."""
    return [
        {
            "part": p.id,
            "row_group": p.row_group,
            "index": p.index,
            "rows": np.ascontiguousarray(p.rows, dtype=np.int64).tobytes(),
            "changed": np.ascontiguousarray(p.changed, dtype=bool).tobytes(),
        }
        for p in parts
    ]


def run_ray(
    job: PartJob, parts: Sequence[Part], address: str | None, actors: int
) -> Generator[PartResult, None, None]:
    """Yield each part's result as the actors finish it (any order). `address`: a Ray cluster,
    or None for a local instance started and stopped here; `actors`: the pool size."""
    import ray  # only when this engine is asked for: the local engine needs no Ray

    if not parts:
        return
    started_here = False
    if not ray.is_initialized():
        # A local instance when no address is given (the driver machine's CPUs).
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        started_here = True
    try:
        pool = min(actors, len(parts))
        dataset = ray.data.from_items(part_items(parts), override_num_blocks=len(parts))
        results = dataset.map_batches(
            PartActor,
            fn_constructor_kwargs={"job": replace(job, intra_op_threads=1)},
            batch_size=1,
            concurrency=pool,
            num_cpus=ACTOR_CPUS,
        )
        logger.info("ray engine: %d parts on %d actors", len(parts), pool)
        for row in results.iter_rows():
            yield PartResult.from_json(row["result"])
    finally:
        if started_here:
            ray.shutdown()
