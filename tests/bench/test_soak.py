"""The soak-and-chaos benchmark (bench/soak.py) compressed into 30 seconds against a real
`userembed serve`, Redis, registry and refresh: every fault happens and shows its effect, no
answer carries a wrong vector, the only errors are retryable ones during the Redis restart, and
the server ends SERVING. Plus the checks the benchmark's verdict rests on."""

from __future__ import annotations

import numpy as np
import pytest

from bench.soak import SoakConfig, run
from bench.soak_chaos import (
    CORRUPT_MODEL,
    FAULT_KINDS,
    HOT_LOAD,
    REDIS_RESTART,
    REFRESH,
    Fault,
    schedule,
)
from bench.soak_report import BEGIN, END, arrays, markdown, unexplained
from bench.soak_traffic import BATCH, MISS, OK, STORED, Calls, Checker, Truth

UNAVAILABLE, INTERNAL = 14, 13


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_thirty_second_soak_sees_every_fault_and_no_wrong_vector() -> None:
    # One server process (a second one doubles the start-up) and no consistency check in the
    # refresh (a Feast store of its own): the set-up and every fault fit in about a minute.
    cfg = SoakConfig(seconds=30, users=1000, redis_down_s=1.0, workers=1, refresh_check=False)
    result = run(cfg)
    assert result["wrong_vectors"] == 0, result["wrong"]
    assert result["vectors_checked"] > 0 and result["totals"]["ok"] > 0
    for kind in (STORED, MISS, BATCH):
        assert result["totals"]["by_kind"][kind] > 0
    faults = {f["kind"]: f for f in result["timeline"]}
    assert set(faults) == set(FAULT_KINDS)
    assert all(f["observed"] for f in result["timeline"]), result["timeline"]
    # the append-only file kept the data over the kill (the writer heartbeat may come and go)
    before, after = faults[REDIS_RESTART]["keys"]
    assert after >= before - 5
    # the corrupt version was refused: the hot-loaded one still answers
    assert faults[CORRUPT_MODEL]["served_version"] == faults[HOT_LOAD]["version"]
    assert result["final_model_version"] == faults[HOT_LOAD]["version"]
    assert faults[REFRESH]["embedding_version"].startswith(faults[HOT_LOAD]["version"])
    assert set(result["totals"]["errors_by_code"]) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
    assert result["unexplained_errors"]["count"] == 0, result["unexplained_errors"]
    assert result["serving_at_end"]
    assert result["ok"]
    md = markdown(result)
    assert md.startswith(BEGIN) and md.endswith(END) and "| vectors checked / wrong |" in md


def test_a_vector_of_another_version_or_a_mislabelled_one_is_wrong() -> None:
    rng = np.random.default_rng(0)
    v1, v2 = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
    truth = Truth()
    truth.add_model("m1", v1.astype(np.float32))
    truth.add_model("m2", v2.astype(np.float32))
    truth.add_embedding_version("ev1", "m1")
    c = Checker(truth)
    c.check(0.0, "3", v1[3].astype(np.float32), "m1", "ev1", STORED)  # right
    c.check(0.0, "3", v1[3].astype(np.float32), "m1", "online-m1", MISS)  # right
    assert c.wrong == 0
    c.check(0.0, "3", v2[3].astype(np.float32), "m1", "ev1", STORED)  # m2's vector, labelled m1
    c.check(0.0, "3", v1[3].astype(np.float32), "m9", "ev1", STORED)  # a version never published
    c.check(0.0, "3", (v1[3] + 1e-2).astype(np.float32), "m1", "ev1", BATCH)  # off by 1e-2
    assert c.wrong == 3
    c.check(0.0, "4", v2[4].astype(np.float32), "m2", "ev1", STORED)  # ev1 holds m1, not m2
    c.finish()
    assert c.wrong == 4  # m9's answer counts once
    assert len(c.wrong_kept) == 4


def test_only_retryable_errors_during_a_redis_restart_are_explained() -> None:
    restart = Fault(REDIS_RESTART, 10.0, started_s=10.0, ended_s=12.0)
    calls = Calls()
    calls.add(5.0, 0.01, STORED, OK)
    calls.add(11.0, 0.01, STORED, UNAVAILABLE)  # during the restart
    calls.add(16.0, 0.01, STORED, UNAVAILABLE)  # within the recovery grace
    calls.add(30.0, 0.01, STORED, UNAVAILABLE)  # long after it
    calls.add(11.0, 0.01, MISS, INTERNAL)  # never a restart's effect
    found = unexplained([restart], arrays(calls))
    assert found["by_code"] == {"UNAVAILABLE": 1, "INTERNAL": 1}


def test_a_short_run_gets_every_fault_once_in_order_and_ten_minutes_five_times() -> None:
    assert [f.kind for f in schedule(30)] == list(FAULT_KINDS)
    assert [f.at_s for f in schedule(30)] == sorted(f.at_s for f in schedule(30))
    long = schedule(600)
    assert len(long) == 5 * len(FAULT_KINDS) and long[-1].at_s < 600
