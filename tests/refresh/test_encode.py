"""The vectorised Arrow encoder used by the batch refresh equals the per-row reference."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from userembed.features import (
    BEHAVIOR_VIEW,
    PROFILE_VIEW,
    FeatureSpec,
    InputSpec,
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
