"""The item cost benchmark's two models (bench/item_cost.py): the MovieLens build with its items
table, one training frame, a model trained with the item attribute map and one without (the
one difference), both exported; and the offline files tiled into thousands of users."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.common import log
from bench.serving_data import DIM

if TYPE_CHECKING:
    from bench.item_cost import ItemCostConfig

WITH, WITHOUT = "with_items", "without_items"
SIDES = (WITH, WITHOUT)
MODEL_NAMES = {WITH: "itemcost-with", WITHOUT: "itemcost-without"}


def build_and_train(cfg: ItemCostConfig, home: Path, store: Any) -> dict[str, Any]:
    """The MovieLens build with items, one training frame, both models trained and exported;
    per side: the model name, its registry version and its encoder input names."""
    import torch

    from trainer.export import export_model
    from trainer.options import config_for
    from trainer.train import train
    from userembed import feast_ops, paths
    from userembed.dataset_build import BuildRequest, build_dataset, load_built, load_built_items

    torch.set_num_threads(cfg.threads)
    built = build_dataset(BuildRequest("movielens", items=True))
    labels, spec = load_built()
    feast_ops.apply(store)
    t0 = time.perf_counter()
    frame = feast_ops.training_frame(store, labels, spec)
    log(f"movielens: {built['users']} users, {built['items']} items; training frame "
        f"{len(frame)} rows in {time.perf_counter() - t0:.0f}s")  # fmt: skip
    maps = {WITH: load_built_items(), WITHOUT: None}  # the one difference between the two
    if maps[WITH] is None:
        raise RuntimeError("the MovieLens build wrote no items table")
    models: dict[str, Any] = {}
    for side in SIDES:
        run_dir = home / "runs" / side
        t0 = time.perf_counter()
        train_cfg = config_for(
            frame,
            tuple(spec.tasks),
            tuple(spec.model_profile_features),
            run_dir,
            sequence_length=spec.sequence_length,
            items=maps[side],
            **cfg.options(),
        )
        result = train(train_cfg, frame, items=maps[side])
        exported = export_model(run_dir, paths.registry_root(), MODEL_NAMES[side])
        inputs = list(exported.manifest.input_spec.feature_names())
        if exported.manifest.vector.dim != DIM:  # the load processes check every reply's size
            raise RuntimeError(f"vectors of {exported.manifest.vector.dim} floats, expected {DIM}")
        log(f"{side}: {result.steps} steps, exported {exported.version} "
            f"({time.perf_counter() - t0:.0f}s); {len(inputs)} inputs")  # fmt: skip
        models[side] = {
            "model": MODEL_NAMES[side],
            "version": exported.version,
            "inputs": inputs,
            "vector_dim": exported.manifest.vector.dim,
            "item_attributes": [a.name for a in exported.manifest.input_spec.item_attributes],
            "attribute_buckets": _attribute_buckets(exported.manifest.input_spec),
        }
    return models


def _attribute_buckets(spec: Any) -> int:
    return spec.long_term.attribute_buckets if spec.long_term is not None else 0


def tile_offline(offline: Path, copies: int) -> int:
    """Replace the offline files by `copies` copies of each user's latest behaviour row and its
    profile, user ids 0..N-1 (copy k of the i-th user: k * users + i). Returns N."""
    from refresh.source import latest_rows, timestamps_ms
    from userembed.paths import BEHAVIOR_FILE, PROFILE_FILE
    from userembed.schema import EVENT_TIMESTAMP, USER_ID

    behavior = pq.read_table(offline / BEHAVIOR_FILE)
    uid = behavior.column(USER_ID).to_numpy()
    behavior = behavior.take(pa.array(latest_rows(uid, timestamps_ms(behavior[EVENT_TIMESTAMP]))))
    profile = pq.read_table(offline / PROFILE_FILE)
    ids = np.unique(behavior.column(USER_ID).to_numpy())
    profile = profile.filter(pc.is_in(profile[USER_ID], pa.array(ids)))

    def tiled(table: pa.Table) -> pa.Table:
        rank = np.searchsorted(ids, table.column(USER_ID).to_numpy())
        parts = [
            table.set_column(
                table.schema.get_field_index(USER_ID), USER_ID, pa.array(k * len(ids) + rank)
            )
            for k in range(copies)
        ]
        return pa.concat_tables(parts)

    pq.write_table(tiled(behavior), offline / BEHAVIOR_FILE)
    pq.write_table(tiled(profile), offline / PROFILE_FILE)
    return copies * len(ids)
