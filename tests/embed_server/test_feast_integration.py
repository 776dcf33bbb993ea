"""The miss path through the real Feast online store (Redis), including a Redis restart."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embed_server.client import EmbeddingClient
from embed_server.online_features import FeastFeatureSource, FeatureRows, check_long_term_present
from embed_server.server import EmbeddingServer
from refresh.job import refresh
from tests.embed_server.conftest import MODEL, SPEC, LoopThread, publish_tiny
from tests.refresh.support import refresh_config
from tests.tiny_model import DIM, LT_SPEC
from userembed import feast_ops
from userembed.datasets import generate_synthetic
from userembed.errors import FeatureMismatchError
from userembed.features import (
    LONG_TERM_LIST_FEATURES,
    LONG_TERM_SCALAR_FEATURES,
    PROFILE_FEATURES,
    SEQUENCE_FEATURES,
    LongTermSpec,
    encode_inputs,
)
from userembed.onnx_encoder import OnnxEncoder
from userembed.registry import Registry
from userembed.snapshots import offline_latest, write_feature_tables

FEATURE_TIME = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
USERS = {
    11: {"item_seq": [3, 4, 5], "category_seq": [1, 2, 1], "age_bucket": 2},
    12: {"item_seq": [40, 41], "category_seq": [6, 6], "age_bucket": 5},
}


def write_offline(offline: Path) -> None:
    offline.mkdir(parents=True)
    ids = list(USERS)
    ts = pa.array([FEATURE_TIME] * len(ids), type=pa.timestamp("us", tz="UTC"))
    behavior = {"user_id": pa.array(ids, pa.int64()), "event_timestamp": ts}
    for f in SEQUENCE_FEATURES:
        behavior[f] = pa.array([USERS[u].get(f, [0, 0]) for u in ids], pa.list_(pa.int64()))
    behavior["seq_len"] = pa.array([len(USERS[u]["item_seq"]) for u in ids], pa.int64())
    for f, width in LongTermSpec().list_lengths.items():  # the view's long-term columns
        behavior[f] = pa.array([[u % 3] * width for u in ids], pa.list_(pa.int64()))
    for f in LONG_TERM_SCALAR_FEATURES:
        behavior[f] = pa.array([u * 100 for u in ids], pa.int64())
    pq.write_table(pa.table(behavior), offline / "behavior.parquet")
    profile = {"user_id": pa.array(ids, pa.int64()), "event_timestamp": ts}
    for f in PROFILE_FEATURES:
        profile[f] = pa.array([USERS[u].get(f, 0) for u in ids], pa.int64())
    pq.write_table(pa.table(profile), offline / "profile.parquet")


def _feast_key(store, user_id: int) -> bytes:
    """The Redis key of a user's Feast online row."""
    from feast.infra.online_stores.helpers import _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    key = EntityKey(join_keys=["user_id"], entity_values=[Value(int64_val=user_id)])
    return _redis_key(store.project, key, store.config.entity_key_serialization_version)


@pytest.fixture
def feast_store(tmp_path, monkeypatch, redis_url):
    monkeypatch.setenv("USEREMBED_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("USEREMBED_OFFLINE_DIR", str(tmp_path / "offline"))
    monkeypatch.setenv("USEREMBED_FEAST_REGISTRY", str(tmp_path / "feast" / "registry.db"))
    write_offline(tmp_path / "offline")
    store = feast_ops.open_store(redis_url)
    feast_ops.apply(store)
    feast_ops.materialize(store)
    return store


def test_feature_rows_match_feasts_own_to_dict(feast_store):
    """The column-wise proto reader gives what OnlineResponse.to_dict() gives, for known users
    and an unknown one (whose values Feast marks PRESENT although they are empty)."""
    refs = SPEC.feast_refs()
    names = [f.name for f in SPEC.sequence_features + SPEC.profile_features]
    rows = FeastFeatureSource(feast_store).fetch(["12", "99", "11"], SPEC)
    want = feast_store.get_online_features(
        features=refs, entity_rows=[{"user_id": u} for u in (12, 99, 11)]
    ).to_dict(include_event_timestamps=True)
    assert rows.columns == {n: want[n] for n in names}
    assert rows.columns["item_seq"][0] == USERS[12]["item_seq"]
    assert rows.found == [True, False, True]
    t = int(FEATURE_TIME.timestamp() * 1000)
    assert rows.feature_ts_ms == [t, 0, t]


@pytest.mark.timeout(180)
def test_miss_path_reads_real_feast_and_survives_redis_restart(
    feast_store, settings_for, registry: Registry, tmp_path, redis_server
):
    publish_tiny(registry, tmp_path / "staging", seed=1)
    loop = LoopThread()
    srv = EmbeddingServer(settings_for(), features=FeastFeatureSource(feast_store))
    try:
        loop.run(srv.start())
        with EmbeddingClient(f"127.0.0.1:{srv.port}", timeout_s=30) as c:
            e = c.get("11")
            assert e.source == "computed"
            assert e.feature_ts_ms == int(FEATURE_TIME.timestamp() * 1000)
            cols = {
                f.name: [USERS[11][f.name]] for f in SPEC.sequence_features + SPEC.profile_features
            }
            want = srv.manager.get(MODEL).encoder.run(encode_inputs(cols, SPEC))[0]
            np.testing.assert_allclose(e.vector, want, rtol=1e-6)
            assert c.get("11").source == "stored"

            res = c.batch_get(["12", "13"])
            assert res[0].source == "computed"
            assert res[1].code == grpc.StatusCode.NOT_FOUND and "unknown user" in res[1].message

            redis_server.stop()
            try:
                with pytest.raises(grpc.RpcError) as ei:
                    c.get("12", force=True)
                assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
            finally:
                redis_server.start()
            # Redis is back but empty: the user is unknown (NOT_FOUND), not an outage ...
            with pytest.raises(grpc.RpcError) as ei:
                c.get("12")
            assert ei.value.code() == grpc.StatusCode.NOT_FOUND
            # ... until the features are materialised again; the same server serves them.
            feast_ops.materialize(feast_store)
            assert c.get("12").source == "computed"

            # An entity hash of the wrong type fails its own user, not the others of the
            # micro-batch it shares (an error reply, not an outage: UNAVAILABLE, not INTERNAL).
            r = redis_server.client()
            r.delete(_feast_key(feast_store, 11))
            r.set(_feast_key(feast_store, 11), "not a hash")
            bad, good = c.batch_get(["11", "12"], force=True)
            assert bad.code == grpc.StatusCode.UNAVAILABLE and "WRONGTYPE" in bad.message
            assert good.source == "computed"
    finally:
        loop.run(srv.stop(grace=0.5))
        loop.close()


@pytest.mark.timeout(180)
def test_cli_serve_embed_models_and_sigterm_drain(feast_store, registry, tmp_path, redis_url):
    """`userembed serve --port 0` prints its port; `embed` and `models` talk to it; SIGTERM
    drains and exits 0, on uvloop (the default event loop). Real Feast (the environment of the
    fixture), real Redis."""
    version = publish_tiny(registry, tmp_path / "staging", seed=1)
    env = {
        **os.environ,
        "USEREMBED_REGISTRY_ROOT": registry.root,
        "REDIS_URL": redis_url,
        "USEREMBED_DRAIN_GRACE_S": "1",
    }
    exe = str(Path(sys.executable).parent / "userembed")
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [exe, "serve", "--port", "0", "--metrics-port", "-1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )
    try:
        line = proc.stdout.readline()  # blocks until bound and loaded (or the process dies)
        m = re.match(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert m, line
        target = f"127.0.0.1:{m.group(1)}"
        run = [exe, "embed", "--user-id", "11", "--target", target]
        out = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "user 11: computed vector dim=8" in out.stdout and version in out.stdout
        out = subprocess.run(
            [exe, "embed", "--user-id", "999", "--target", target],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2 and "NOT_FOUND: unknown user" in out.stderr
        out = subprocess.run(
            [exe, "models", "--target", target], env=env, capture_output=True, text=True, timeout=60
        )
        listed = json.loads(out.stdout)
        assert listed["default_model"] == MODEL and listed["models"][0]["version"] == version
        out = subprocess.run(
            [exe, "health", "--target", target], env=env, capture_output=True, text=True, timeout=60
        )
        assert (out.returncode, out.stdout.strip()) == (0, "SERVING")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "event loop: uvloop" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(300)
def test_recomputed_vectors_equal_the_refreshed_ones_with_long_term_features(
    tmp_path, monkeypatch, redis_url, registry: Registry, settings_for
):
    """Real snapshots (long-term features included) -> Feast online store -> the server's miss
    path, against the refresh over the offline files: the same vector per user. A model
    exported without the long-term input is served from the same store."""
    monkeypatch.setenv("USEREMBED_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("USEREMBED_OFFLINE_DIR", str(tmp_path / "offline"))
    monkeypatch.setenv("USEREMBED_FEAST_REGISTRY", str(tmp_path / "feast" / "registry.db"))
    events, users, _, spec = generate_synthetic(120, seed=4)
    offline = tmp_path / "offline"
    write_feature_tables(events, users, spec, offline, sequence_length=LT_SPEC.sequence_length)
    store = feast_ops.open_store(redis_url)
    feast_ops.apply(store, fresh=True)
    feast_ops.materialize(store)
    publish_tiny(registry, tmp_path / "staging", seed=1, spec=LT_SPEC)
    publish_tiny(registry, tmp_path / "staging", seed=2, model="old")  # no long-term input
    refreshed = refresh(refresh_config(registry, redis_url, offline, part_rows=50, batch_size=16))
    assert refreshed.users == 120
    latest = offline_latest(offline).set_index("user_id")
    ids = ["0", "7", "33", "101"]
    assert (latest.loc[[int(u) for u in ids], "lt_distinct_items"] > 0).all()
    loop = LoopThread()
    srv = EmbeddingServer(
        settings_for(models=(MODEL, "old"), default_model=MODEL),
        features=FeastFeatureSource(store),
    )
    try:
        loop.run(srv.start())
        with EmbeddingClient(f"127.0.0.1:{srv.port}", timeout_s=30) as c:
            for u in ids:
                stored = c.get(u)
                assert stored.source == "stored"
                recomputed = c.get(u, force=True)
                assert recomputed.source == "computed"
                np.testing.assert_allclose(recomputed.vector, stored.vector, rtol=1e-5, atol=1e-6)
            old = c.get("7", model="old")
            assert old.source == "computed"
        rows = {n: [latest.loc[7, n]] for n in SPEC.feature_names()}
        enc = OnnxEncoder(registry.load_verified("old").session_source(), DIM, 1)
        np.testing.assert_allclose(old.vector, enc.run(encode_inputs(rows, SPEC))[0], rtol=1e-6)
    finally:
        loop.run(srv.stop(grace=0.5))
        loop.close()


def test_a_registry_without_the_long_term_features_is_a_feature_mismatch(feast_store):
    """A model that reads features the applied repository does not define: one clear error."""
    other_view = replace(LT_SPEC, long_term=LongTermSpec(view="user_profile"))
    with pytest.raises(FeatureMismatchError, match="lacks features the model reads"):
        FeastFeatureSource(feast_store).fetch(["11"], other_view)
    rows = FeastFeatureSource(feast_store).fetch(["11", "99"], LT_SPEC)
    assert rows.found == [True, False]
    assert rows.columns["lt_distinct_items"] == [1100, None]


def test_known_users_without_long_term_values_are_refused_not_encoded_as_empty() -> None:
    """Online rows materialised before the long-term features existed (Feast keeps the older
    row on an equal timestamp) must not silently encode as users without history."""
    names = LT_SPEC.feature_names()
    columns = {n: [[1, 2], None] for n in names}
    columns["lt_distinct_items"] = [None, None]
    rows = FeatureRows(columns=columns, found=[True, False], feature_ts_ms=[1, 0])
    with pytest.raises(FeatureMismatchError, match="lt_category_counts"):
        check_long_term_present(
            FeatureRows(
                {**columns, LONG_TERM_LIST_FEATURES[0]: [None, None]}, [True, False], [1, 0]
            ),
            LT_SPEC,
        )
    with pytest.raises(FeatureMismatchError, match="lt_distinct_items"):
        check_long_term_present(rows, LT_SPEC)
    check_long_term_present(rows, SPEC)  # a model without the long-term input reads none
