"""No silent train/serve skew (issue #21): `materialize` replaces the online rows of a rebuilt
data set whose timestamps did not change, and `userembed check` (the demo and every refresh run
it) reports online rows that disagree with the offline files and stored vectors that disagree
with a recompute. Real Redis, real Feast, the tiny ONNX model, a real refresh."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from refresh.config import RefreshConfig
from refresh.errors import RefreshValidationError
from refresh.job import refresh
from tests.tiny_model import LT_SPEC, MODEL, publish_tiny
from userembed import feast_ops, paths
from userembed.commands import main as cli
from userembed.consistency import FEATURES, NOT_ONLINE, VECTOR, CheckConfig, check
from userembed.dataset_build import BuildRequest, build_dataset
from userembed.datasets import generate_synthetic
from userembed.features import BEHAVIOR_VIEW, PROFILE_VIEW
from userembed.redis_urls import open_redis
from userembed.registry import Registry
from userembed.snapshots import offline_latest
from userembed.vectors import VectorStore

NUM_USERS = 40
CORRECTED = "age_bucket"  # a profile column the tiny model reads


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, redis_server: Any) -> Iterator[dict[str, Any]]:
    """A workspace with the team's parquet files twice: users without `age_bucket`, then the
    corrected file with it (same users, same events: the feature rows keep their timestamps);
    the Feast repository applied, the tiny model (long-term input) published."""
    tmp = tmp_path_factory.mktemp("consistency")
    events, users, labels, _ = generate_synthetic(NUM_USERS, seed=3)
    src = tmp / "src"
    src.mkdir()
    events.to_parquet(src / "events.parquet")
    labels.to_parquet(src / "labels.parquet")
    users.drop(columns=[CORRECTED]).to_parquet(src / "users_v1.parquet")
    users.to_parquet(src / "users_v2.parquet")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("USEREMBED_HOME", str(tmp / "home"))
        mp.setenv("USEREMBED_REGISTRY_ROOT", str(tmp / "models"))
        mp.setenv("REDIS_URL", redis_server.url)
        mp.delenv("USEREMBED_OFFLINE_DIR", raising=False)
        mp.delenv("USEREMBED_FEAST_REGISTRY", raising=False)
        registry = Registry(str(tmp / "models"))
        publish_tiny(registry, tmp / "staging", seed=1, spec=LT_SPEC)
        _build(src, "users_v1")
        store = feast_ops.open_store(redis_server.url)
        feast_ops.apply(store)
        yield {"src": src, "store": store, "users": users, "registry": registry}


def _build(src: Path, users_file: str) -> None:
    build_dataset(
        BuildRequest(
            source="parquet",
            events_path=src / "events.parquet",
            users_path=src / f"{users_file}.parquet",
            labels_path=src / "labels.parquet",
        )
    )


def _rebuild(env: dict[str, Any], users_file: str) -> None:
    """`data build` + `feast apply` of one users file (the issue's sequence)."""
    _build(env["src"], users_file)
    feast_ops.apply(env["store"])


def _refresh(**overrides: Any) -> Any:
    cfg = RefreshConfig(model=MODEL, part_rows=16, batch_size=16, **overrides)
    return refresh(cfg)


def _cfg(**overrides: Any) -> CheckConfig:
    return CheckConfig(model=MODEL, **overrides)


def test_materialize_replaces_rows_of_a_rebuilt_data_set_with_equal_timestamps(
    env: dict[str, Any], redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = env["store"]
    ids = [0, 1, 2, 3]
    want = env["users"].set_index("user_id").loc[ids, CORRECTED].tolist()
    _rebuild(env, "users_v1")
    feast_ops.materialize(store)
    assert feast_ops.online_features(store, ids)[CORRECTED] == [-1] * 4  # absent: padding
    _rebuild(env, "users_v2")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=feast_ops.__name__):
        feast_ops.materialize(store)
    # Feast alone keeps the stored row (the same event timestamp): the old -1s stayed.
    assert feast_ops.online_features(store, ids)[CORRECTED] == want
    assert f"materialize {PROFILE_VIEW}: its offline file changed since" in caplog.text
    assert f"materialize {BEHAVIOR_VIEW}:" not in caplog.text  # the events did not change


def test_materialize_of_unchanged_files_keeps_a_row_pushed_since(
    env: dict[str, Any], redis_url: str
) -> None:
    """Only a changed file's rows are written over: fresher pushed behaviour survives the
    next materialise of the same data set."""
    store = env["store"]
    _rebuild(env, "users_v2")
    feast_ops.materialize(store)
    row = offline_latest(paths.offline_dir(), [5])
    row["event_timestamp"] = pd.Timestamp.now(tz="UTC")
    row["item_seq"] = pd.Series([[7, 8, 9]], index=row.index)
    feast_ops.push_behavior(store, row[["user_id", "event_timestamp", *feast_ops.BEHAVIOR_COLUMNS]])
    feast_ops.materialize(store)
    assert feast_ops.online_features(store, [5])["item_seq"] == [[7, 8, 9]]
    # ... and the check counts it as newer online, not as a mismatch.
    report = check(_cfg(), env["store"])
    assert report.newer_online == 1 and report.feature_mismatches == 0 and report.ok


def test_check_passes_on_a_consistent_setup_and_fails_on_a_tampered_vector(
    env: dict[str, Any], redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _rebuild(env, "users_v2")
    feast_ops.materialize(env["store"])
    summary = _refresh()
    assert summary.check is not None and summary.check["ok"], summary.check
    assert "check: consistent" in summary.line()

    report = check(_cfg(sample=10), env["store"])
    assert report.ok and report.users == 10 and report.vectors_checked == 10, report.lines()
    assert report.embedding_version == summary.embedding_version
    assert report.max_abs_diff < 1e-5
    assert cli.main(["check", "--model", MODEL]) == 0
    assert "consistent" in capsys.readouterr().out

    store = VectorStore(open_redis(redis_url), MODEL)
    ev = summary.embedding_version
    (good,) = store.read(ev, ["7"])
    (other,) = store.read(ev, ["9"])
    assert good is not None and other is not None
    # A vector stored as float16 is within the looser tolerance ...
    store.write(ev, ["9"], other.vector[None, :], summary.model_version, dtype="f16")
    assert check(_cfg(), env["store"]).ok
    # ... a tampered one is not.
    store.write(ev, ["7"], good.vector[None, :] + 1e-3, summary.model_version)
    report = check(_cfg(), env["store"])
    assert not report.ok and report.vector_mismatches == 1, report.lines()
    assert [(m.user_id, m.kind) for m in report.mismatches] == [("7", VECTOR)]
    assert report.feature_mismatches == 0 and not report.stale_views
    assert cli.main(["check", "--model", MODEL]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "user 7: vector" in out


def test_check_reports_stale_online_rows_and_the_refresh_setting_decides_the_flip(
    env: dict[str, Any], redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's reproduction: the corrected users file built but its rows not online. The
    refresh's vectors (offline files) then differ from the server's recompute (online rows)."""
    _rebuild(env, "users_v1")
    feast_ops.materialize(env["store"])
    _rebuild(env, "users_v2")  # corrected, not materialised

    with pytest.raises(RefreshValidationError, match="MISMATCH"):
        _refresh(check_blocks_flip=True)
    assert VectorStore(open_redis(redis_url), MODEL).current_version() is None  # no flip

    with caplog.at_level(logging.ERROR, logger="refresh.job"):
        summary = _refresh()  # the default: report, and switch readers anyway
    assert summary.check is not None and not summary.check["ok"]
    assert "switching readers anyway" in caplog.text and "MISMATCH" in summary.line()
    report = check(_cfg(), env["store"])
    assert set(report.stale_views) == {PROFILE_VIEW}
    differ = int((env["users"][CORRECTED] != -1).sum())  # corrected value is not the padding
    assert report.feature_mismatches == differ == report.vector_mismatches, report.lines()
    assert {m.kind for m in report.mismatches} == {FEATURES, VECTOR}
    assert any(f"{CORRECTED} (online -1, offline" in m.detail for m in report.mismatches)

    feast_ops.materialize(env["store"])  # the fix: the changed file's rows are written over
    assert check(_cfg(), env["store"]).ok


def test_check_reports_users_without_online_rows(env: dict[str, Any], redis_url: str) -> None:
    _rebuild(env, "users_v2")
    feast_ops.materialize(env["store"])
    r = open_redis(redis_url)
    r.delete(_feast_key(env["store"], 4))
    report = check(_cfg(), env["store"])
    assert not report.ok and report.not_online == 1
    assert ("4", NOT_ONLINE) in [(m.user_id, m.kind) for m in report.mismatches]
    assert report.embedding_version is None  # nothing refreshed: vectors not compared
    assert "vectors not compared" in report.headline()


def test_a_refresh_without_materialised_rows_skips_the_check(
    env: dict[str, Any], redis_url: str
) -> None:
    _rebuild(env, "users_v2")
    summary = _refresh()
    assert summary.check is not None and "nothing materialised" in summary.check["skipped"]
    assert _refresh(check_sample=0).check is None


def _feast_key(store: Any, user_id: int) -> bytes:
    from feast.infra.online_stores.helpers import _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    key = EntityKey(join_keys=["user_id"], entity_values=[Value(int64_val=user_id)])
    return _redis_key(store.project, key, store.config.entity_key_serialization_version)
