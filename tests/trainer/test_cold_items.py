"""Cold items: users whose events are items never seen in training, but described in the items
table, land near users of the same taste; with the item id alone they cannot.

tiny_frame's users have a taste (0..3) that shows only in their items here (the event
categories are blanked, no long-term input, no taste-linked profile): item i is of kind
i // 10. The cold users' items are new ids (1000 + a random permutation: under the hashing
policy they fall on random trained rows) of the same kinds, listed in the items table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.trainer.frames import tiny_frame
from trainer.batches import build_input_spec, task_names_of
from trainer.config import ModelConfig, MoEConfig, TrainConfig
from trainer.evaluate import score_rows
from trainer.model import load_unsharded
from trainer.run_dir import RunDir
from trainer.train import train
from userembed.items import ItemAttributeMap, items_frame

WARM = np.arange(40, dtype=np.int64)
COLD = 1000 + np.random.default_rng(7).permutation(40).astype(np.int64)  # COLD[i]: kind i // 10


def _blank_categories(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(category_seq=[[0] * len(s) for s in frame["item_seq"]])


def _items() -> ItemAttributeMap:
    ids = np.concatenate([WARM, COLD])
    kind = np.concatenate([WARM // 10, np.arange(40) // 10])
    items = pd.DataFrame({"item_id": ids, "categories": [np.array([k], np.int64) for k in kind]})
    return ItemAttributeMap.from_frame(items, items_frame(items, "cold items"))


def _train(run_dir: Path, frame: pd.DataFrame, items: ItemAttributeMap | None) -> Path:
    spec = build_input_spec(frame, ("region",), sequence_length=12, long_term=False, items=items)
    cfg = TrainConfig(
        run_dir=str(run_dir),
        model=ModelConfig(
            input_spec=spec,
            task_names=task_names_of(frame),
            embedding_dim=16,
            num_heads=2,
            user_dim=8,
            tower_hidden=8,
            moe=MoEConfig(num_experts=2, expert_hidden=16),
        ),
        batch_size=32,
        max_steps=60,
        eval_every=30,
        checkpoint_every=60,
        seed=1,
    )
    train(cfg, frame, items=items)
    return run_dir


def _taste(items: list[int]) -> int:
    return int(np.bincount(np.asarray(items) // 10, minlength=4).argmax())


def _margin(run_dir: Path, warm: pd.DataFrame, cold: pd.DataFrame, tastes: np.ndarray) -> float:
    """Mean over cold users of cos(own taste's warm centroid) - mean cos(other centroids)."""
    model = load_unsharded(RunDir(run_dir).model)
    items = RunDir(run_dir).items()
    warm_vec, _ = score_rows(model, warm, items=items)
    cold_vec, _ = score_rows(model, cold, items=items)
    warm_taste = np.array([_taste(s) for s in warm["item_seq"]])
    centroids = np.stack([warm_vec[warm_taste == t].mean(axis=0) for t in range(4)])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    cos = cold_vec @ centroids.T  # (N, 4); user vectors are unit length
    own = cos[np.arange(len(cold)), tastes]
    others = (cos.sum(axis=1) - own) / 3
    return float((own - others).mean())


@pytest.mark.parametrize("seed", [0])
def test_cold_items_land_near_their_kind(tmp_path: Path, seed: int) -> None:
    frame = _blank_categories(tiny_frame(400, seed=seed))
    people = _blank_categories(tiny_frame(200, seed=seed + 50))
    people = people[people["item_seq"].map(len) >= 4]  # a clear taste
    tastes = np.array([_taste(s) for s in people["item_seq"]])
    cold = people.assign(item_seq=[COLD[np.asarray(s)].tolist() for s in people["item_seq"]])
    warm = frame[frame["item_seq"].map(len) >= 4]

    with_items = _margin(_train(tmp_path / "items", frame, _items()), warm, cold, tastes)
    id_only = _margin(_train(tmp_path / "ids", frame, None), warm, cold, tastes)
    # The id-only model sees random trained rows: no taste. With items it sees their kinds.
    assert abs(id_only) < 0.1, id_only
    assert with_items > id_only + 0.3, (with_items, id_only)  # measured: about 1.0 vs 0.0
