"""The batch refresh against a real Redis and a real registry: full run and pointer flip,
validation failures, SIGKILL + resume, incremental runs, rollback and version expiry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import redis

from refresh.checkpoint import PART_PREFIX
from refresh.config import RefreshConfig
from refresh.errors import NoVersionError, RefreshValidationError
from refresh.job import refresh
from refresh.source import OfflineSource
from refresh.versions import rollback
from tests.refresh.support import (
    DAY_MS,
    T0_MS,
    latest_rows_python,
    offline_tables,
    poisoned_encoder,
    publish_model,
    refresh_config,
    write_offline,
)
from tests.tiny_model import DIM, LT_SPEC, MODEL, SPEC, publish_tiny
from userembed.errors import SchemaError
from userembed.features import InputSpec, encode_inputs
from userembed.onnx_encoder import OnnxEncoder
from userembed.registry import Registry
from userembed.vectors import STATUS_BUILDING, STATUS_FAILED, STATUS_READY, VectorStore

N_USERS = 600


@pytest.fixture
def offline(tmp_path: Path) -> tuple[Path, pa.Table, pa.Table]:
    behavior, profile = offline_tables(N_USERS, seed=1)
    return write_offline(tmp_path / "offline", behavior, profile), behavior, profile


@pytest.fixture
def cfg(
    redis_url: str, registry: Registry, offline: tuple[Path, pa.Table, pa.Table]
) -> RefreshConfig:
    return refresh_config(
        registry,
        redis_url,
        offline[0],
        part_rows=400,  # row groups of 1000 rows: parts of 400, 400, 200
        batch_size=64,
        drift_sample=200,
    )


def store_of(cfg: RefreshConfig) -> VectorStore:
    return VectorStore(redis.Redis.from_url(cfg.redis_url), cfg.model)


def expected_vectors(registry: Registry, behavior: pa.Table, profile: pa.Table, users: list[int]):
    """What the encoder gives each user's latest features, via the per-row reference path."""
    loaded = registry.load_verified(MODEL)
    enc = OnnxEncoder(loaded.session_source(), DIM, 1)
    latest = latest_rows_python(behavior)
    ages = dict(zip(profile["user_id"].to_pylist(), profile["age_bucket"].to_pylist(), strict=True))
    rows = {f.name: [latest[u][f.name] for u in users] for f in SPEC.sequence_features}
    rows["age_bucket"] = [ages[u] for u in users]
    return enc.run(encode_inputs(rows, SPEC)), [latest[u]["event_timestamp"] for u in users]


def test_plan_takes_each_users_latest_row_in_parts_within_row_groups(offline) -> None:
    directory, behavior, _ = offline
    src = OfflineSource(directory, SPEC)
    plan = src.plan(part_rows=400)
    assert plan.users == N_USERS == sum(len(p.rows) for p in plan.parts)
    assert [p.id for p in plan.parts][:3] == ["0.0", "0.1", "0.2"]
    latest = latest_rows_python(behavior)
    seen = []
    for part in plan.parts:
        t = src.read_part(part, 400)
        for r in t.select(["user_id", "item_seq"]).to_pylist():
            assert r["item_seq"] == latest[r["user_id"]]["item_seq"]
            seen.append(r["user_id"])
    assert sorted(seen) == list(range(N_USERS))
    # Out of file order (as Ray actors read them) a part still reads the same rows.
    for part in reversed(plan.parts[:4]):
        t = src.read_part(part, 400)
        assert (
            t["user_id"].to_pylist()
            == OfflineSource(directory, SPEC).read_part(part, 400)["user_id"].to_pylist()
        )


def test_full_refresh_writes_every_user_then_flips_the_pointer(cfg, registry, tmp_path, offline):
    publish_tiny(registry, tmp_path / "staging", seed=0)
    s = refresh(cfg)
    store = store_of(cfg)
    assert store.current_version() == s.embedding_version
    assert s.embedding_version.startswith(s.model_version + ".")
    assert (s.users, s.computed, s.previous_version) == (N_USERS, N_USERS, None)
    assert store.count(s.embedding_version) == N_USERS
    assert store.version_info(s.embedding_version).status == STATUS_READY

    users = [0, 5, 17, 333, N_USERS - 1]
    want, ts = expected_vectors(registry, offline[1], offline[2], users)
    got = store.read(s.embedding_version, [str(u) for u in users])
    np.testing.assert_allclose(np.stack([g.vector for g in got]), want, rtol=1e-5, atol=1e-6)
    assert [g.feature_ts_ms for g in got] == [int(t.timestamp() * 1000) for t in ts]

    # A second run of the same model on the same data: a new version, no drift.
    s2 = refresh(cfg)
    assert s2.embedding_version != s.embedding_version
    assert s2.previous_version == s.embedding_version
    assert store.current_version() == s2.embedding_version
    assert s2.drift["mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert s2.drift["knn_overlap"] == pytest.approx(1.0)


def test_nan_vectors_fail_validation_and_readers_stay(cfg, registry, tmp_path) -> None:
    publish_tiny(registry, tmp_path / "staging", seed=0)
    good = refresh(cfg).embedding_version
    publish_model(registry, tmp_path / "staging", poisoned_encoder(seed=0, nan_item=3), "bad")
    with pytest.raises(RefreshValidationError, match="NaN"):
        refresh(cfg)
    store = store_of(cfg)
    assert store.current_version() == good
    failed = [v for v in store.list_versions() if v.status == STATUS_FAILED]
    assert len(failed) == 1 and failed[0].id != good
    # A failed version is never resumed: the next good run starts a fresh one.
    publish_tiny(registry, tmp_path / "staging", seed=4)
    s = refresh(cfg)
    assert s.embedding_version != failed[0].id and s.parts_resumed == 0


def test_norm_bounds_fail_validation(cfg, registry, tmp_path) -> None:
    publish_tiny(registry, tmp_path / "staging", seed=0)
    with pytest.raises(RefreshValidationError, match="norms"):
        refresh(replace(cfg, max_norm=1e-3))
    assert store_of(cfg).current_version() is None


def test_killed_refresh_resumes_its_version_without_recomputing_done_parts(
    cfg, registry, tmp_path
) -> None:
    publish_tiny(registry, tmp_path / "staging", seed=0)
    old = refresh(cfg).embedding_version
    publish_tiny(registry, tmp_path / "staging", seed=1)
    store = store_of(cfg)
    cmd = [
        str(Path(sys.executable).with_name("userembed")), "refresh", "--model", MODEL,
        "--part-rows", "100", "--batch-size", "32", "--pause-s", "0.5", "--lock-ttl-s", "1",
        "--offline-dir", cfg.offline_dir, "--registry-root", cfg.registry_root,
        "--redis-url", cfg.redis_url,
    ]  # fmt: skip
    log = tmp_path / "refresh.log"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    try:
        building, done_before = None, {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(done_before) < 3 and proc.poll() is None:
            time.sleep(0.1)
            vs = [v for v in store.list_versions() if v.status == STATUS_BUILDING]
            if vs:
                building = vs[-1].id
                meta = store.r.hgetall(store.keys.meta(building))
                done_before = {k: v for k, v in meta.items() if k.startswith(PART_PREFIX.encode())}
        assert proc.poll() is None, f"the run ended before it was killed: {log.read_text()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert building is not None and len(done_before) >= 3
    # Killed midway: the old version kept serving, the new one is still building.
    assert store.current_version() == old
    assert store.version_info(building).status == STATUS_BUILDING
    users = [str(u) for u in range(N_USERS)]
    before = {
        u: v.computed_at_ms for u, v in zip(users, store.read(building, users), strict=True) if v
    }
    users_done = sum(json.loads(v)["users"] for v in done_before.values())

    s = refresh(replace(cfg, part_rows=100, lock_wait_s=10))  # the killed run's lock expires
    assert s.embedding_version == building and s.previous_version == old
    assert store.current_version() == building
    assert s.parts_resumed >= len(done_before)
    assert N_USERS - s.computed >= users_done
    assert store.count(building) == N_USERS
    # Exactly the users of parts finished before the kill kept their vectors (same computed_at);
    # a part cut off midway was redone.
    after = store.read(building, users)
    kept = sum(1 for u, a in zip(users, after, strict=True) if before.get(u) == a.computed_at_ms)
    assert kept == N_USERS - s.computed


def test_incremental_refresh_recomputes_only_users_with_newer_features(
    cfg, registry, tmp_path, offline
) -> None:
    publish_tiny(registry, tmp_path / "staging", seed=0)
    first = refresh(cfg)
    store = store_of(cfg)
    directory, behavior, profile = offline
    # A new snapshot for 25 users, newer than anything the first run saw.
    fresh = behavior.filter(pc.is_in(behavior["user_id"], pa.array(range(25)))).slice(0, 25)
    newer = fresh.set_column(
        1,
        "event_timestamp",
        pa.array([T0_MS + 10 * DAY_MS] * len(fresh), pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
    )
    changed = set(newer["user_id"].to_pylist())
    write_offline(directory, pa.concat_tables([behavior, newer]), profile)

    s = refresh(replace(cfg, mode="incremental"))
    assert s.mode == "incremental"
    assert (s.computed, s.copied, s.users) == (len(changed), N_USERS - len(changed), N_USERS)
    assert store.current_version() == s.embedding_version
    assert store.count(s.embedding_version) == N_USERS
    users = [str(u) for u in range(N_USERS)]
    old, new = store.read(first.embedding_version, users), store.read(s.embedding_version, users)
    for u, o, n in zip(range(N_USERS), old, new, strict=True):
        if u in changed:
            assert n.feature_ts_ms == T0_MS + 10 * DAY_MS
        else:  # carried over as is
            assert (n.computed_at_ms, n.feature_ts_ms) == (o.computed_at_ms, o.feature_ts_ms)
            np.testing.assert_array_equal(n.vector, o.vector)
    # Nothing newer since: the next incremental run computes nobody.
    assert refresh(replace(cfg, mode="incremental")).computed == 0


def test_incremental_after_a_model_change_recomputes_everyone(cfg, registry, tmp_path) -> None:
    publish_tiny(registry, tmp_path / "staging", seed=0)
    refresh(cfg)
    publish_tiny(registry, tmp_path / "staging", seed=1)
    s = refresh(replace(cfg, mode="incremental"))
    assert (s.mode, s.computed) == ("full", N_USERS)
    assert "mean_cosine" not in s.drift and 0.0 <= s.drift["knn_overlap"] <= 1.0


def test_rollback_and_keep_last_versions(cfg, registry, tmp_path) -> None:
    publish_tiny(registry, tmp_path / "staging", seed=0)
    store = store_of(cfg)
    with pytest.raises(NoVersionError):
        rollback(store)
    evs = [refresh(replace(cfg, keep=2)).embedding_version for _ in range(3)]
    # keep=2: the oldest is gone with its vectors.
    assert [v.id for v in store.list_versions()] == evs[1:]
    assert store.count(evs[0]) == 0
    assert rollback(store) == (evs[2], evs[1])
    assert store.current_version() == evs[1]
    with pytest.raises(NoVersionError):
        rollback(store)  # nothing older than evs[1] is left
    assert rollback(store, to=evs[2]) == (evs[1], evs[2])
    with pytest.raises(NoVersionError, match="unknown"):
        rollback(store, to=evs[0])


def test_refresh_and_rollback_cli(cfg, registry, tmp_path) -> None:
    publish_tiny(registry, tmp_path / "staging", seed=0)
    from userembed.commands.main import main

    args = ["--model", MODEL, "--redis-url", cfg.redis_url]
    paths = ["--offline-dir", cfg.offline_dir, "--registry-root", cfg.registry_root]
    assert main(["refresh", *args, *paths, "--part-rows", "1000"]) == 0
    assert main(["refresh", *args, *paths, "--part-rows", "1000"]) == 0
    first, second = [v.id for v in store_of(cfg).list_versions()]
    assert main(["rollback", *args]) == 0
    assert store_of(cfg).current_version() == first
    assert main(["rollback", *args, "--to", "nope"]) == 2  # one line, exit 2


def _refresh_built_offline_files(
    spec: InputSpec, redis_url: str, registry: Registry, tmp_path: Path
) -> tuple[RefreshConfig, Any, pd.DataFrame]:
    """Offline files as `data build` writes them (300 synthetic users), a tiny model of `spec`
    published, one refresh; returns its config, summary and each user's newest snapshot row."""
    from userembed.datasets.synthetic import generate_synthetic
    from userembed.snapshots import offline_latest, write_feature_tables

    events, users, _, dataset = generate_synthetic(300, seed=2)
    offline = tmp_path / "offline"
    write_feature_tables(events, users, dataset, offline, sequence_length=spec.sequence_length)
    publish_tiny(registry, tmp_path / "staging", seed=0, spec=spec)
    cfg = refresh_config(registry, redis_url, offline, part_rows=70, batch_size=32)
    return cfg, refresh(cfg), offline_latest(offline)


def test_refresh_reads_the_data_pipelines_offline_files(redis_url, registry, tmp_path) -> None:
    """The real offline layout (userembed/snapshots.py: one row group per snapshot) gives each
    user the vector of its newest snapshot, as the data engineer's `offline_latest` reads it."""
    cfg, s, latest = _refresh_built_offline_files(SPEC, redis_url, registry, tmp_path)
    assert s.users == len(latest) == 300
    rows = {f.name: list(latest[f.name]) for f in SPEC.sequence_features + SPEC.profile_features}
    loaded = registry.load_verified(MODEL)
    want = OnnxEncoder(loaded.session_source(), DIM, 1).run(encode_inputs(rows, SPEC))
    got = store_of(cfg).read(s.embedding_version, [str(u) for u in latest["user_id"]])
    np.testing.assert_allclose(np.stack([g.vector for g in got]), want, rtol=1e-5, atol=1e-6)


def test_refresh_of_a_long_term_model_encodes_the_whole_history_columns(
    redis_url, registry, tmp_path
) -> None:
    """A model with the long-term input reads the lt_* columns of the same behaviour rows and
    gets the vectors of the per-row reference; they differ from what empty long-term rows
    would give (the input reaches the vector)."""
    cfg, s, latest = _refresh_built_offline_files(LT_SPEC, redis_url, registry, tmp_path)
    rows = {n: list(latest[n]) for n in LT_SPEC.feature_names()}
    enc = OnnxEncoder(registry.load_verified(MODEL).session_source(), DIM, 1)
    want = enc.run(encode_inputs(rows, LT_SPEC))
    got = store_of(cfg).read(s.embedding_version, [str(u) for u in latest["user_id"]])
    np.testing.assert_allclose(np.stack([g.vector for g in got]), want, rtol=1e-5, atol=1e-6)
    no_history = enc.run(
        encode_inputs(
            {**rows, **dict.fromkeys(LT_SPEC.long_term_names, [None] * len(latest))}, LT_SPEC
        )
    )
    assert np.abs(no_history - want).max() > 1e-3


def test_refresh_of_a_long_term_model_over_files_without_them_is_one_clear_error(
    cfg, registry, tmp_path
) -> None:
    publish_tiny(registry, tmp_path / "staging", seed=0, spec=LT_SPEC)
    with pytest.raises(SchemaError, match="lt_category_counts' is missing .*rebuild the data set"):
        refresh(cfg)
