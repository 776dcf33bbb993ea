"""The vectorised Arrow encoder used by the batch refresh equals the per-row reference."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest

from userembed.errors import FeatureMismatchError
from userembed.features import (
    BEHAVIOR_VIEW,
    LONG_TERM_INPUT,
    LONG_TERM_SCALAR_FEATURES,
    PROFILE_VIEW,
    FeatureSpec,
    InputSpec,
    LongTermSpec,
    encode_arrow,
    encode_inputs,
)

SPEC = InputSpec(
    sequence_length=5,
    sequence_features=(
        FeatureSpec("item_seq", 1000, BEHAVIOR_VIEW),
        FeatureSpec("category_seq", 7, BEHAVIOR_VIEW),
    ),
    profile_features=(
        FeatureSpec("age_bucket", 8, PROFILE_VIEW),
        FeatureSpec("region", 3, PROFILE_VIEW),
    ),
)


def random_rows(n: int, seed: int) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {}
    for f in SPEC.sequence_features:
        col: list = []
        for _ in range(n):
            k = int(rng.integers(-1, 12))  # -1: a null list; 0: empty; up to 11 > L
            col.append(None if k < 0 else rng.integers(0, 5000, size=k).tolist())
        rows[f.name] = col
    for f in SPEC.profile_features:
        rows[f.name] = [None if rng.random() < 0.2 else int(rng.integers(0, 50)) for _ in range(n)]
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_encode_arrow_equals_encode_inputs_on_random_rows(seed: int) -> None:
    rows = random_rows(300, seed)
    table = pa.table(
        {
            **{
                f.name: pa.array(rows[f.name], pa.list_(pa.int64())) for f in SPEC.sequence_features
            },
            **{f.name: pa.array(rows[f.name], pa.int64()) for f in SPEC.profile_features},
        }
    )
    want = encode_inputs(rows, SPEC)
    got = encode_arrow(table, SPEC)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # Slices (record batches cut from a bigger one) keep absolute offsets into the values.
    sub = {k: v[120:250] for k, v in rows.items()}
    for name, arr in encode_arrow(table.slice(120, 130), SPEC).items():
        np.testing.assert_array_equal(arr, encode_inputs(sub, SPEC)[name], err_msg=name)
    # A chunked column (a table read from several row groups) gives the same answer.
    chunked = pa.concat_tables([table.slice(0, 100), table.slice(100)])
    for name, arr in encode_arrow(chunked, SPEC).items():
        np.testing.assert_array_equal(arr, want[name], err_msg=name)


def test_encode_arrow_keeps_the_last_events_oldest_first() -> None:
    table = pa.table(
        {
            "item_seq": pa.array([[1, 2, 3, 4, 5, 6, 7], [9], []], pa.list_(pa.int64())),
            "category_seq": pa.array([None, [1], [2]], pa.list_(pa.int64())),
            "age_bucket": pa.array([1, None, 2], pa.int64()),
            "region": pa.array([0, 1, None], pa.int64()),
        }
    )
    got = encode_arrow(table, SPEC)
    # hash_ids: id + 1 below the table size; padding (no event) is 0.
    np.testing.assert_array_equal(got["item_seq"][0], [4, 5, 6, 7, 8])
    np.testing.assert_array_equal(got["item_seq"][1], [10, 0, 0, 0, 0])
    np.testing.assert_array_equal(got["item_seq"][2], [0, 0, 0, 0, 0])
    np.testing.assert_array_equal(got["category_seq"][0], [0, 0, 0, 0, 0])
    assert got["profile"].shape == (3, 2) and got["profile"][1, 0] == 0


LT = LongTermSpec(category_buckets=5, window_days=(1, 7))
LT_SPEC = replace(SPEC, long_term=LT)


def long_term_rows(n: int, seed: int) -> dict[str, list]:
    """Random long-term features, None (a missing row) for about 1 in 6 users."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {}
    missing = rng.random(n) < 0.17
    for name, width in LT.list_lengths.items():
        rows[name] = [None if m else rng.integers(0, 30, size=width).tolist() for m in missing]
    for name in LONG_TERM_SCALAR_FEATURES:
        rows[name] = [None if m else int(rng.integers(-1, 10**7)) for m in missing]
    return rows


def arrow_table(rows: dict[str, list]) -> pa.Table:
    lists = {f.name for f in SPEC.sequence_features} | set(LT.list_lengths)
    return pa.table(
        {
            n: pa.array(v, pa.list_(pa.int64()) if n in lists else pa.int64())
            for n, v in rows.items()
        }
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_encode_arrow_equals_encode_inputs_on_long_term_features(seed: int) -> None:
    """The refresh's vectorised path and the server's per-row path give the same floats."""
    rows = {**random_rows(250, seed), **long_term_rows(250, seed)}
    table = arrow_table(rows)
    want = encode_inputs(rows, LT_SPEC)
    assert want[LONG_TERM_INPUT].shape == (250, LT_SPEC.long_term_width)
    assert want[LONG_TERM_INPUT].dtype == np.float32
    for got in (
        encode_arrow(table, LT_SPEC),
        encode_arrow(pa.concat_tables([table.slice(0, 90), table.slice(90)]), LT_SPEC),
    ):
        assert set(got) == set(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    sub = {k: v[100:180] for k, v in rows.items()}
    np.testing.assert_array_equal(
        encode_arrow(table.slice(100, 80), LT_SPEC)[LONG_TERM_INPUT],
        encode_inputs(sub, LT_SPEC)[LONG_TERM_INPUT],
    )
    # A missing row encodes as a user without history: all zeros.
    gone = [i for i, v in enumerate(rows["lt_category_counts"]) if v is None]
    assert gone and not want[LONG_TERM_INPUT][gone].any()


def test_long_term_lists_of_another_width_are_a_feature_mismatch() -> None:
    rows = {**random_rows(3, 0), **long_term_rows(3, 0)}
    rows["lt_category_counts"] = [[1] * 32] * 3  # built with the default 32 buckets, not 5
    with pytest.raises(FeatureMismatchError, match="lt_category_counts holds 32 values"):
        encode_inputs(rows, LT_SPEC)
    with pytest.raises(FeatureMismatchError, match="lt_category_counts holds 32 values"):
        encode_arrow(arrow_table(rows), LT_SPEC)
    with pytest.raises(FeatureMismatchError, match="lack"):
        encode_inputs(random_rows(3, 0), LT_SPEC)


def test_long_term_encoding_follows_the_documented_columns() -> None:
    lt = LongTermSpec()
    rows = {
        "item_seq": [[1, 2, 3, 4]],
        "category_seq": [[0, 0, 1, 33]],
        "age_bucket": [1],
        "region": [0],
        "lt_category_counts": [[2, 2] + [0] * 30],  # category 33 -> bucket 1
        "lt_event_type_counts": [[0, 2, 0, 2] + [0] * 4],
        "lt_window_counts": [[1, 3, 4]],
        "lt_attribute_counts": [[3, 1] + [0] * 30],  # genres of the items: 4 values
        "lt_distinct_items": [4],
        "lt_distinct_categories": [3],
        "lt_seconds_since_first": [9 * 86_400],
        "lt_seconds_since_last": [86_400],
    }
    x = encode_inputs(rows, replace(SPEC, long_term=lt))[LONG_TERM_INPUT][0]
    col = dict(zip(lt.column_names(), x.tolist(), strict=True))
    assert col["has_history"] == 1.0
    assert col["log_events"] == pytest.approx(np.log1p(4) / np.log1p(10_000), rel=1e-6)
    assert col["category_share_0"] == col["category_share_1"] == 0.5
    assert col["category_entropy"] == pytest.approx(np.log(2) / np.log(32), rel=1e-6)
    assert col["event_type_mean"] == pytest.approx(2 / 7, rel=1e-6)
    assert col["event_type_std"] == pytest.approx(1 / 7, rel=1e-6)
    assert col["log_days_since_last"] == pytest.approx(np.log1p(1) / np.log1p(3650), rel=1e-6)
    assert col["log_days_since_first"] == pytest.approx(np.log1p(9) / np.log1p(3650), rel=1e-6)
    assert col["log_events_28d"] == pytest.approx(np.log1p(4) / np.log1p(10_000), rel=1e-6)
    assert col["attribute_share_0"] == 0.75 and col["attribute_share_1"] == 0.25
    # a model without items reads no attribute histogram, and its input is the same otherwise
    no_items = replace(lt, attribute_buckets=0)
    y = encode_inputs(rows, replace(SPEC, long_term=no_items))[LONG_TERM_INPUT][0]
    assert y.tolist() == x[: no_items.width].tolist()
    assert not any("lt_attribute_counts" in r for r in no_items.feast_refs())
