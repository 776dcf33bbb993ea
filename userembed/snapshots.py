"""Point-in-time feature tables: the Feast offline parquet files built from the input tables.

`behavior.parquet` holds one row per user per snapshot time (every cut, plus the final snapshot
at the data end that serving materialises). A snapshot at time s holds only events with
timestamp strictly before s, the last N of them, oldest first, so a label at cut s joined to it
by Feast's point-in-time join (feature time <= label time) can never see an event at or after
its label time. The same row holds the user's long-term features
(`userembed.features.LONG_TERM_FEATURES`): counts over ALL events strictly before s (category
and event-type histograms, events in recent windows, distinct items and categories, seconds
since the first and the last event, and with an items table the histogram of its multi-valued
attributes' values). `profile.parquet` holds one row per user stamped at the
data start. Everything is vectorised: lexsorts once, then prefix counts, offsets, one gather
and one bincount per histogram per snapshot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from userembed.datasets.spec import DatasetSpec, to_utc
from userembed.features import (
    DEFAULT_SEQUENCE_LENGTH,
    LT_ATTRIBUTE_COUNTS,
    LT_CATEGORY_COUNTS,
    LT_DISTINCT_CATEGORIES,
    LT_DISTINCT_ITEMS,
    LT_EVENT_TYPE_COUNTS,
    LT_SECONDS_SINCE_FIRST,
    LT_SECONDS_SINCE_LAST,
    LT_WINDOW_COUNTS,
    PROFILE_FEATURES,
    SEQ_LEN_FEATURE,
    SEQUENCE_FEATURES,
    LongTermSpec,
    gap_buckets,
)
from userembed.items import ItemAttributeMap
from userembed.paths import BEHAVIOR_FILE, PROFILE_FILE
from userembed.staged_files import StagedFiles

logger = logging.getLogger(__name__)

# Raw event column behind each sequence feature (gap_bucket_seq is derived from timestamps).
_SEQ_SOURCE = {"item_seq": "item_id", "category_seq": "category_id", "event_type_seq": "event_type"}
_TS_TYPE = pa.timestamp("us", tz="UTC")
_CHUNK = 4_000_000


@dataclass(frozen=True)
class SortedEvents:
    """Events sorted by (user, time) with per-user row ranges; built once, sliced per snapshot."""

    user_ids: np.ndarray  # (U,) every user that gets feature rows, sorted
    first: np.ndarray  # (U,) first event row of each user
    last: np.ndarray  # (U,) one past the last event row
    ts_ns: np.ndarray  # (E,) int64 event time
    columns: dict[str, np.ndarray]  # sequence feature name -> (E,) int64 values
    user_index: np.ndarray  # (E,) position in user_ids of each event's user
    # (E + 1,) prefix sums of "first event of the user with this item / category", so the
    # distinct count over any per-user prefix [first, end) is new[end] - new[first].
    new_items: np.ndarray
    new_categories: np.ndarray
    # (E, K) the values of each event's item in the items table's multi-valued attributes
    # (userembed.items.history_attributes), -1 = none; None without such attributes
    attribute_values: np.ndarray | None = None


def timestamps_ns(col: pd.Series) -> np.ndarray:
    """A timestamp column (naive = UTC, or tz-aware) -> int64 nanoseconds since the epoch."""
    ts = pd.to_datetime(col, utc=True)
    if ts.dt.unit == "ns":  # the common case: a view, no copy
        return np.asarray(ts.array.asi8)
    return ts.dt.tz_localize(None).astype("datetime64[ns]").to_numpy().view(np.int64)


def sort_events(
    events: pd.DataFrame, user_ids: np.ndarray, history_items: ItemAttributeMap | None = None
) -> SortedEvents:
    """`history_items`: the map of the attributes the long-term attribute histogram counts."""
    uid = events["user_id"].to_numpy(dtype=np.int64)
    ts_ns = timestamps_ns(events["event_timestamp"])
    same_user = uid[1:] == uid[:-1]
    if np.all((uid[1:] > uid[:-1]) | (same_user & (ts_ns[1:] >= ts_ns[:-1]))):
        # Already sorted by (user, time), as the generators write it: no sort, no copies.
        cols = {f: events[src].to_numpy(dtype=np.int64) for f, src in _SEQ_SOURCE.items()}
    else:
        order = np.lexsort((ts_ns, uid))
        uid, ts_ns = uid[order], ts_ns[order]
        cols = {f: events[src].to_numpy(dtype=np.int64)[order] for f, src in _SEQ_SOURCE.items()}
    del same_user
    # Gap to the previous event of the same user, over the full history (-1: none -> bucket 0).
    # Chunked: gap_buckets makes several float temporaries per element.
    buckets = np.zeros(len(uid), dtype=np.int64)
    for lo in range(1, len(uid), _CHUNK):
        hi = min(lo + _CHUNK, len(uid))
        same = uid[lo:hi] == uid[lo - 1 : hi - 1]
        gaps = np.where(same, (ts_ns[lo:hi] - ts_ns[lo - 1 : hi - 1]) / 1e9, -1.0)
        buckets[lo:hi] = gap_buckets(gaps)
    cols["gap_bucket_seq"] = buckets
    all_ids = np.union1d(np.asarray(user_ids, dtype=np.int64), uid)
    first = np.searchsorted(uid, all_ids, side="left")
    last = np.searchsorted(uid, all_ids, side="right")
    user_index = np.repeat(np.arange(len(all_ids), dtype=np.int64), last - first)  # (E,)
    return SortedEvents(
        all_ids,
        first,
        last,
        ts_ns,
        cols,
        user_index,
        _first_seen_prefix(user_index, cols["item_seq"]),
        _first_seen_prefix(user_index, cols["category_seq"]),
        _attribute_values(history_items, cols["item_seq"]),
    )


def _attribute_values(items: ItemAttributeMap | None, item_ids: np.ndarray) -> np.ndarray | None:
    """(E, K) every value of each event's item over the map's attributes, -1 = none."""
    if items is None or not items.names:
        return None
    looked_up = items.lookup(item_ids)  # {name: (E, K_a)}
    return np.concatenate([looked_up[n] for n in items.names], axis=1)


def _first_seen_prefix(user_index: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(E + 1,) prefix sums of "no earlier event of the same user has this value" over events
    sorted by (user, time)."""
    span = int(values.max()) + 1 if len(values) else 1
    n_users = int(user_index[-1]) + 1 if len(user_index) else 1
    if len(values) and values.min() >= 0 and span < 2**62 // n_users:
        # one int64 key (user, value); a stable sort keeps time order within a key (~10x
        # faster than the three-key lexsort below)
        order = np.argsort(user_index * span + values, kind="stable")
    else:
        order = np.lexsort((np.arange(len(values)), values, user_index))  # user, value, time
    u, v = user_index[order], values[order]
    head = np.ones(len(order), dtype=bool)
    head[1:] = (u[1:] != u[:-1]) | (v[1:] != v[:-1])
    first_seen = np.zeros(len(order), dtype=np.int64)
    first_seen[order[head]] = 1
    return np.concatenate([[0], np.cumsum(first_seen)])


def _prefix_end(ev: SortedEvents, at_ns: int) -> np.ndarray:
    """(U,) one past each user's last event strictly before `at_ns` (a per-user prefix)."""
    before = np.concatenate([[0], np.cumsum(ev.ts_ns < at_ns)])  # prefix counts
    return ev.first + (before[ev.last] - before[ev.first])


def _histogram(
    ev: SortedEvents, in_prefix: np.ndarray, values: np.ndarray, buckets: int
) -> pa.Array:
    """Per user, the events of `in_prefix` per bucket (value mod buckets) -> list<int64>[buckets]."""
    n = len(ev.user_ids)
    key = ev.user_index[in_prefix] * buckets + np.mod(values[in_prefix], buckets)
    counts = np.bincount(key, minlength=n * buckets).astype(np.int64)  # (U * buckets,)
    return _fixed_lists(counts, n, buckets)


def _value_histogram(ev: SortedEvents, in_prefix: np.ndarray, buckets: int) -> pa.Array:
    """Per user, the item attribute values of the events of `in_prefix` per bucket (value mod
    buckets), every value of an item counted -> list<int64>[buckets]; zeros without values."""
    n = len(ev.user_ids)
    if ev.attribute_values is None or not buckets:
        return _fixed_lists(np.zeros(n * buckets, dtype=np.int64), n, buckets)
    values = ev.attribute_values[in_prefix]  # (E', K)
    users = np.broadcast_to(ev.user_index[in_prefix][:, None], values.shape)
    valid = values >= 0
    key = users[valid] * buckets + np.mod(values[valid], buckets)
    counts = np.bincount(key, minlength=n * buckets).astype(np.int64)  # (U * buckets,)
    return _fixed_lists(counts, n, buckets)


def _fixed_lists(flat: np.ndarray, n: int, width: int) -> pa.Array:
    offsets = np.arange(n + 1, dtype=np.int64) * width
    list_cls = pa.ListArray if len(flat) < 2**31 else pa.LargeListArray
    dtype = np.int32 if len(flat) < 2**31 else np.int64
    return list_cls.from_arrays(pa.array(offsets.astype(dtype)), pa.array(flat))


def long_term_columns(
    ev: SortedEvents, at_ns: int, end: np.ndarray, lt: LongTermSpec
) -> dict[str, pa.Array]:
    """The long-term features of every user at `at_ns`: counts over the events
    [first, end), i.e. all of the user's events strictly before `at_ns`."""
    n_users = len(ev.user_ids)
    in_prefix = ev.ts_ns < at_ns  # (E,) exactly the per-user prefixes [first, end)
    windows = []
    for days in lt.window_days:
        since = _prefix_end(ev, at_ns - days * 86_400 * 10**9)  # events before the window
        windows.append(end - since)
    window_counts = np.stack(windows, axis=1).reshape(-1) if windows else np.zeros(0, np.int64)
    has = end > ev.first
    if len(ev.ts_ns):
        first_ts = ev.ts_ns[np.minimum(ev.first, len(ev.ts_ns) - 1)]
        last_ts = ev.ts_ns[np.maximum(end - 1, 0)]
    else:
        first_ts = last_ts = np.zeros(n_users, dtype=np.int64)
    return {
        LT_CATEGORY_COUNTS: _histogram(
            ev, in_prefix, ev.columns["category_seq"], lt.category_buckets
        ),
        LT_EVENT_TYPE_COUNTS: _histogram(
            ev, in_prefix, ev.columns["event_type_seq"], lt.event_type_buckets
        ),
        LT_WINDOW_COUNTS: _fixed_lists(
            window_counts.astype(np.int64), n_users, len(lt.window_days)
        ),
        LT_ATTRIBUTE_COUNTS: _value_histogram(ev, in_prefix, lt.attribute_buckets),
        LT_DISTINCT_ITEMS: pa.array(ev.new_items[end] - ev.new_items[ev.first]),
        LT_DISTINCT_CATEGORIES: pa.array(ev.new_categories[end] - ev.new_categories[ev.first]),
        LT_SECONDS_SINCE_FIRST: pa.array(np.where(has, (at_ns - first_ts) // 10**9, -1)),
        LT_SECONDS_SINCE_LAST: pa.array(np.where(has, (at_ns - last_ts) // 10**9, -1)),
    }


def snapshot(
    ev: SortedEvents,
    at: pd.Timestamp,
    sequence_length: int,
    long_term: LongTermSpec | None = None,
) -> pa.Table:
    """Behaviour rows of every user at time `at`: the last N events strictly before it, and
    the long-term features of all events strictly before it."""
    at_ns = to_utc(at).value
    end = _prefix_end(ev, at_ns)  # events < at are a per-user prefix
    start = np.maximum(ev.first, end - sequence_length)
    lengths = end - start  # (U,)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    gather = np.repeat(start - offsets[:-1], lengths) + np.arange(offsets[-1])  # (sum lengths,)
    n = len(ev.user_ids)
    arrays: dict[str, pa.Array] = {
        "user_id": pa.array(ev.user_ids),
        "event_timestamp": pa.array(np.full(n, at_ns // 1000, dtype=np.int64), type=_TS_TYPE),
    }
    pa_offsets = pa.array(offsets.astype(np.int32 if offsets[-1] < 2**31 else np.int64))
    list_cls = pa.ListArray if offsets[-1] < 2**31 else pa.LargeListArray
    for name in SEQUENCE_FEATURES:
        arrays[name] = list_cls.from_arrays(pa_offsets, pa.array(ev.columns[name][gather]))
    arrays[SEQ_LEN_FEATURE] = pa.array(lengths.astype(np.int64))
    arrays.update(long_term_columns(ev, at_ns, end, long_term or LongTermSpec()))
    return pa.table(arrays)


def profile_table(users: pd.DataFrame, user_ids: np.ndarray, at: pd.Timestamp) -> pa.Table:
    """One profile row per user stamped `at`; absent attributes (or users) are -1 (padding)."""
    u = users.drop_duplicates("user_id", keep="last").set_index("user_id")
    u = u.reindex(user_ids)
    arrays: dict[str, pa.Array] = {
        "user_id": pa.array(np.asarray(user_ids, dtype=np.int64)),
        "event_timestamp": pa.array(
            np.full(len(user_ids), to_utc(at).value // 1000, dtype=np.int64), type=_TS_TYPE
        ),
    }
    for f in PROFILE_FEATURES:
        col = u[f].to_numpy(dtype=np.float64) if f in u.columns else np.full(len(u), np.nan)
        arrays[f] = pa.array(np.where(np.isnan(col), -1, col).astype(np.int64))
    return pa.table(arrays)


def write_feature_tables(
    events: pd.DataFrame,
    users: pd.DataFrame,
    spec: DatasetSpec,
    out_dir: Path,
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
    staged: StagedFiles | None = None,
    history_items: ItemAttributeMap | None = None,
) -> dict[str, object]:
    """Write profile.parquet and behavior.parquet (one row group per snapshot) into out_dir.

    Files are staged (userembed.staged_files) and renamed at the end, so a failure leaves the
    previous tables in place; with `staged`, they join the caller's files and the caller
    commits. Returns a summary of figures.
    """
    t0 = time.perf_counter()
    ev = sort_events(events, users["user_id"].to_numpy(dtype=np.int64), history_items)
    times = spec.snapshot_times
    files = staged if staged is not None else StagedFiles()
    tmp_behavior = files.path(out_dir / BEHAVIOR_FILE)
    tmp_profile = files.path(out_dir / PROFILE_FILE)
    rows = 0
    writer: pq.ParquetWriter | None = None
    try:
        try:
            for i, at in enumerate(times):
                table = snapshot(ev, at, sequence_length)
                if writer is None:
                    writer = pq.ParquetWriter(tmp_behavior, table.schema)
                writer.write_table(table)
                rows += table.num_rows
                logger.info(
                    "snapshot %d/%d at %s: %d users, %d events (%.1fs)",
                    i + 1,
                    len(times),
                    at.isoformat(),
                    table.num_rows,
                    len(table["item_seq"].combine_chunks().values),
                    time.perf_counter() - t0,
                )
        finally:
            if writer is not None:
                writer.close()
        pq.write_table(profile_table(users, ev.user_ids, to_utc(spec.data_start)), tmp_profile)
    except BaseException:
        files.discard()
        raise
    if staged is None:
        files.commit()
    summary = {
        "users": int(len(ev.user_ids)),
        "snapshots": len(times),
        "behavior_rows": rows,
        "seconds": round(time.perf_counter() - t0, 2),
        "offline_dir": str(out_dir),
    }
    logger.info("feature tables: %s", summary)
    return summary


def offline_latest(offline_dir: Path, user_ids: Sequence[int] | None = None) -> pd.DataFrame:
    """The latest behaviour + profile row per user, read in bulk from the offline parquet files.

    For the nightly refresh: one row per user (its newest snapshot), columns user_id,
    event_timestamp, the sequence features, seq_len, the long-term features and the profile
    ints.
    """
    behavior = pads.dataset(offline_dir / BEHAVIOR_FILE)
    latest = pa.compute.max(behavior.to_table(columns=["event_timestamp"])["event_timestamp"])
    flt = pads.field("event_timestamp") == latest
    if user_ids is not None:
        flt = flt & pads.field("user_id").isin(pa.array(np.asarray(user_ids, dtype=np.int64)))
    b = behavior.to_table(filter=flt).to_pandas()
    p = pq.read_table(offline_dir / PROFILE_FILE, columns=["user_id", *PROFILE_FEATURES])
    p_df = p.to_pandas().drop_duplicates("user_id", keep="last")
    return b.merge(p_df, on="user_id", how="left").sort_values("user_id", ignore_index=True)
