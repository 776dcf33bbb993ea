"""`userembed status`: each stage's state and the next command, read from the real places (files,
the registry, a real Redis, a real Feast online store)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import redis

from tests.conftest import free_port
from tests.tiny_model import MODEL, publish_tiny
from trainer.run_dir import RunDir
from userembed import paths
from userembed import prerequisites as pre
from userembed import status as st
from userembed.commands import main as cli
from userembed.commands.status import runs
from userembed.registry import Registry
from userembed.vectors import STATUS_FAILED, VectorStore

NOBODY = st.ServerProbe("127.0.0.1:1", None)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str) -> Path:
    for name in ("USEREMBED_OFFLINE_DIR", "USEREMBED_FEAST_REGISTRY", "USEREMBED_REGISTRY_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("USEREMBED_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REDIS_URL", redis_url)
    return tmp_path / "home"


def _registry() -> Registry:
    """The registry status reads: $USEREMBED_HOME/models."""
    return Registry(paths.registry_root())


def _by_stage(status: st.Status) -> dict[str, st.Check]:
    return {c.stage: c for c in status.checks}


def test_a_fresh_home_names_the_data_build_first(home: Path) -> None:
    status = st.gather([], NOBODY)
    checks = _by_stage(status)
    assert list(checks) == [
        "redis", "data set", "feast", "online rows", "runs", "registry", "embeddings", "server",
    ]  # fmt: skip
    assert checks["redis"].state == st.OK
    assert checks["data set"].state == st.MISSING and checks["data set"].next == pre.DATA_BUILD
    # Later stages wait for their inputs: no command that would only fail
    assert checks["feast"].state == st.MISSING and checks["feast"].next == ""
    assert {checks[s].state for s in ("online rows", "embeddings")} == {st.UNKNOWN}
    assert checks["server"].next == ""
    assert status.next == pre.DATA_BUILD
    assert status.lines()[-1] == "next: userembed data build"


def test_status_json_is_one_object_for_scripts(home: Path, capsys) -> None:
    target = f"127.0.0.1:{free_port()}"
    assert cli.main(["status", "--json", "--target", target]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["next"] == pre.DATA_BUILD and out["home"] == str(home.resolve())
    server = out["checks"][-1]
    assert server["stage"] == "server" and server["details"] == {"target": target, "health": None}


def _run_folder(root: Path, name: str, aucs: dict[str, float] | None) -> Path:
    run = RunDir(root / name)
    run.root.mkdir(parents=True)
    if aucs is None:  # stopped before its final model: only a checkpoint
        run.checkpoint(0).parent.mkdir()
        run.checkpoint(0).write_bytes(b"x")
    else:
        run.model.write_bytes(b"x")
        run.report.write_text(json.dumps({"test": {t: {"auc": a} for t, a in aucs.items()}}))
    return run.root


def test_runs_show_their_test_aucs_and_the_export_to_run_next(home: Path) -> None:
    done = _run_folder(paths.runs_dir(), "r1", {"click": 0.71, "churn": 0.8})
    time.sleep(0.01)
    _run_folder(paths.runs_dir(), "r2", None)
    found = runs()
    assert [(r.run_id, r.finished) for r in found] == [("r1", True), ("r2", False)]
    checks = _by_stage(st.gather(found, NOBODY))
    assert checks["runs"].state == st.OK
    assert checks["runs"].more[0] == "r1: click=0.7100 churn=0.8000"
    assert "r2: no final model" in checks["runs"].more[1]
    assert checks["registry"].next == f"userembed export --run {done}"


def test_a_failed_refresh_shows_its_reason_and_the_version_that_still_serves(
    home: Path, redis_url: str, tmp_path: Path
) -> None:
    first = publish_tiny(_registry(), tmp_path / "staging", seed=1)
    store = VectorStore(redis.Redis.from_url(redis_url), MODEL)
    store.create_version("v1", first)
    store.publish("v1", users=5)
    serving = st.ServerProbe("127.0.0.1:1", "SERVING")
    checks = _by_stage(st.gather([], serving, model=MODEL))
    assert checks["embeddings"].state == st.OK and "v1" in checks["embeddings"].summary
    assert checks["server"].state == st.OK

    store.create_version("v2", first)
    store.mark("v2", STATUS_FAILED, note="part 0: 3 vectors hold NaN")
    emb = _by_stage(st.gather([], serving, model=MODEL))["embeddings"]
    assert emb.state == st.FAILED and emb.next == pre.REFRESH
    assert "readers stay on v1" in emb.summary
    assert emb.more == ("v2: part 0: 3 vectors hold NaN",)

    store.create_version("v3", first)
    store.publish("v3", users=5)
    publish_tiny(_registry(), tmp_path / "staging", seed=2)  # `latest` moves on
    emb = _by_stage(st.gather([], serving, model=MODEL))["embeddings"]
    assert emb.state == st.STALE and "not computed yet" in emb.more[-1]


def test_a_redis_that_does_not_answer_leaves_the_other_stages_shown(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    checks = _by_stage(st.gather([], NOBODY))
    assert checks["redis"].state == st.MISSING and "REDIS_URL" in checks["redis"].summary
    assert checks["data set"].next == pre.DATA_BUILD
    assert len(checks) == 8


@pytest.mark.slow
def test_online_rows_are_compared_with_the_offline_tables(
    home: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from userembed import feast_ops
    from userembed.dataset_build import BuildRequest, build_dataset, load_built
    from userembed.snapshots import offline_latest

    monkeypatch.setattr(st, "ONLINE_SAMPLE", 10_000)  # every row, so one pushed row is seen
    build_dataset(BuildRequest("synthetic", 300, seed=3))
    _, spec = load_built()
    store = feast_ops.open_store(redis_url)
    feast_ops.apply(store, fresh=True)
    assert _by_stage(st.gather([], NOBODY))["online rows"].next == pre.FEAST_MATERIALIZE

    # Materialised up to an earlier snapshot: older than the data set's last one.
    end = pd.Timestamp(spec.data_end) - pd.Timedelta(days=1)
    feast_ops.materialize(store, end=end.to_pydatetime())
    online = _by_stage(st.gather([], NOBODY))["online rows"]
    assert online.state == st.STALE and online.next == pre.FEAST_MATERIALIZE, online

    feast_ops.materialize(store)
    online = _by_stage(st.gather([], NOBODY))["online rows"]
    assert online.state == st.OK and online.details["rows"] == "300", online

    # A row dated after the data set (an earlier data set's, or pushed): Feast keeps it.
    row = offline_latest(paths.offline_dir(), [3])[["user_id", *feast_ops.BEHAVIOR_COLUMNS]]
    row["event_timestamp"] = pd.Timestamp.now(tz="UTC")
    feast_ops.push_behavior(store, row)
    online = _by_stage(st.gather([], NOBODY))["online rows"]
    assert online.state == st.STALE and online.details["newer"] == 1, online
    assert online.next == f"{pre.FEAST_FRESH} && {pre.FEAST_MATERIALIZE}"
