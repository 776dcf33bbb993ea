"""The pieces of forgetting a user (docs/forget.md) on a real Redis: tombstones, which versions
the command deletes from and which the refresh's pass does, the refresh plan without forgotten
users, and the canonical ids it accepts. The end-to-end test with Feast, refreshes and a server
is tests/embed_server/test_forget.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import redis

from refresh.source import OfflineSource
from tests.refresh.support import offline_tables, write_offline
from tests.tiny_model import MODEL, SPEC
from userembed.errors import InvalidInputError
from userembed.forget import (
    Tombstones,
    forget_users,
    honour_in_refresh,
    release_users,
)
from userembed.vectors import STATUS_BUILDING, STATUS_READY, VectorStore, pushed_key


def test_forget_deletes_every_finished_version_and_the_refresh_pass_the_building_one(
    redis_url: str,
) -> None:
    r = redis.Redis.from_url(redis_url)
    store = VectorStore(r, MODEL)
    vectors = np.ones((2, 4), dtype=np.float32)
    for ev, status in (("v1", STATUS_READY), ("online-m1", "online"), ("v2", STATUS_BUILDING)):
        store.create_version(ev, "m1")
        store.mark(ev, status)
        store.write(ev, ["1", "2"], vectors, "m1")
    for user in ("1", "2"):  # freshness markers (docs/freshness.md)
        r.set(pushed_key(user), 1_000)

    report = forget_users(["1"], redis_url, models=[MODEL], features=False)
    assert not r.exists(pushed_key("1")) and r.exists(pushed_key("2"))
    assert (report.vectors_deleted, report.feature_rows_deleted) == (2, -1)
    assert [store.read(ev, ["1", "2"])[0] is None for ev in ("v1", "online-m1", "v2")] == [
        True,
        True,
        False,  # a running refresh's version: its own pass after the flip deletes it
    ]
    first = Tombstones(r).all()["1"]
    forget_users(["1"], redis_url, models=[], features=False)
    assert Tombstones(r).all() == {"1": first}  # forgotten again: the first time stays

    # The refresh's pass: every version, and only the tombstones of users it planned without
    # that the offline files no longer hold are dropped.
    Tombstones(r).add(["7", "8"])
    assert honour_in_refresh(store, planned_without={"1", "7", "8"}, still_held={"1", "8"}) == (
        1,
        1,
    )
    assert store.read("v2", ["1", "2"])[0] is None and store.read("v2", ["2"])[0] is not None
    assert Tombstones(r).ids() == {"1", "8"}
    assert release_users(["1", "8", "9"], redis_url) == 2 and Tombstones(r).ids() == set()


def test_forget_accepts_only_canonical_ids(redis_url: str) -> None:
    for bad in (["042"], ["+4"], ["4 "], []):
        with pytest.raises(InvalidInputError):
            forget_users(bad, redis_url, models=[], features=False)
    assert not redis.Redis.from_url(redis_url).exists("ue:forgotten")


def test_the_refresh_plan_leaves_forgotten_users_out_and_names_those_the_files_hold(
    tmp_path: Path,
) -> None:
    behavior, profile = offline_tables(20, seed=3)
    behavior = behavior.filter(pc.field("user_id") != 5)  # user 5: a profile row only
    source = OfflineSource(write_offline(tmp_path / "offline", behavior, profile), SPEC)
    everyone = source.plan(part_rows=400)
    plan = source.plan(part_rows=400, forgotten={"3", "5", "999"})
    assert (everyone.users, plan.users) == (19, 18)
    assert plan.held_forgotten == ("3", "5")  # 999: in neither file
    planned = set(source.sample_user_ids(plan, plan.users))
    assert "3" not in planned and len(planned) == 18
