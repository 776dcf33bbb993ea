"""A model with item attributes served and refreshed: the server's model load and the refresh
both look items up in the map shipped in the registry entry, and give the same vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embed_server.model_manager import load_serving_model
from refresh.job import refresh
from tests.refresh.support import refresh_config
from tests.trainer.frames import tiny_frame
from tests.trainer.test_item_attributes import _config, item_map
from trainer.export import export_model
from trainer.train import train
from userembed.datasets.synthetic import generate_synthetic
from userembed.errors import FeatureMismatchError
from userembed.features import encode_inputs
from userembed.registry import Registry
from userembed.snapshots import offline_latest, write_feature_tables
from userembed.vectors import VectorStore


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    frame = tiny_frame(200)
    run = tmp_path_factory.mktemp("items-run")
    train(_config(run, frame, item_map()), frame, items=item_map())
    root = tmp_path_factory.mktemp("reg")
    export_model(run, str(root), "m", ("fp32",))
    return Registry(root)


def test_refresh_and_server_model_use_the_shipped_map(
    published: Registry, redis_url: str, tmp_path: Path
) -> None:
    events, users, _, dataset = generate_synthetic(120, seed=3)
    events["item_id"] %= 45  # items 0..39 are in the map, 40..44 are not
    offline = tmp_path / "offline"
    spec = published.read_manifest("m").input_spec
    write_feature_tables(events, users, dataset, offline, sequence_length=spec.sequence_length)
    cfg = refresh_config(published, redis_url, offline, model="m", part_rows=50, batch_size=16)
    summary = refresh(cfg)
    latest = offline_latest(offline)
    served = load_serving_model(published, "m", "latest", 1)
    assert served.items is not None and served.items.names == ("tags", "brand")
    rows = {n: list(latest[n]) for n in spec.feature_names()}
    want = served.encoder.run(encode_inputs(rows, served.spec, served.items))  # the miss path
    import redis

    store = VectorStore(redis.Redis.from_url(redis_url), "m", None)
    got = store.read(summary.embedding_version, [str(u) for u in latest["user_id"]])
    np.testing.assert_allclose(np.stack([g.vector for g in got]), want, rtol=1e-5, atol=1e-6)
    # The attributes reach the vector: without the map's values the vectors differ.
    empty = type(served.items)(
        served.items.item_ids[:0], {k: v[:0] for k, v in served.items.values.items()}
    )
    assert np.abs(served.encoder.run(encode_inputs(rows, served.spec, empty)) - want).max() > 1e-3
    with pytest.raises(FeatureMismatchError, match="item attribute map"):
        encode_inputs(rows, served.spec)
