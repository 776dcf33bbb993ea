"""Future targets of the self-supervised objective: what each user engages with after a cut.

For every label row (user, cut t) the items and categories of the user's events in the window
(t, t + window] become that row's targets, with their offsets in seconds after t. They are
FUTURE information: `userembed data build` writes them as list columns of labels.parquet,
they pass through Feast's point-in-time join as extra entity columns (never as features), the
trainer scores the user vector against them (trainer/future_loss.py), and nothing of them
reaches the encoder's inputs, Feast views, the export or the refresh. Features use events
strictly before t (userembed/snapshots.py), targets events strictly after it.

Each target column is embedded by the table of one sequence input (TARGET_TABLES) and hashed
exactly as that input (userembed.features.hash_ids).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pandas as pd

from userembed.datasets.spec import DatasetSpec
from userembed.schema import LABEL_TIMESTAMP, USER_ID
from userembed.snapshots import timestamps_ns

logger = logging.getLogger(__name__)

FUTURE_ITEMS = "future_item_ids"
FUTURE_CATEGORIES = "future_category_ids"
FUTURE_OFFSETS = "future_offsets_s"  # seconds after the cut, one per target event
FUTURE_COLUMNS: tuple[str, ...] = (FUTURE_ITEMS, FUTURE_CATEGORIES, FUTURE_OFFSETS)
# Target column -> (raw event column, sequence input whose table embeds it).
TARGET_SOURCES: dict[str, str] = {FUTURE_ITEMS: "item_id", FUTURE_CATEGORIES: "category_id"}
TARGET_TABLES: dict[str, str] = {FUTURE_ITEMS: "item_seq", FUTURE_CATEGORIES: "category_seq"}

# Target events kept per label row: evenly spaced over the row's future events in time order,
# so a very active user's window is covered end to end, not only its first hours.
MAX_FUTURE_EVENTS = 32
# Window when the data set names neither a label horizon nor two cuts to take a cadence from.
DEFAULT_FUTURE_WINDOW_SECONDS = 7 * 24 * 3600


def future_window_seconds(spec: DatasetSpec) -> int:
    """The data set's future window: its label horizon (targets then look exactly as far ahead
    as the labels do), else the smallest gap between two cuts (the cadence a team labels at),
    else DEFAULT_FUTURE_WINDOW_SECONDS."""
    if spec.label_horizon_seconds:
        return int(spec.label_horizon_seconds)
    cuts = spec.cut_times
    gaps = [int((b - a).total_seconds()) for a, b in zip(cuts, cuts[1:], strict=False)]
    gaps = [g for g in gaps if g > 0]
    return min(gaps) if gaps else DEFAULT_FUTURE_WINDOW_SECONDS


def future_targets(
    events: pd.DataFrame,
    labels: pd.DataFrame,
    window_seconds: int,
    max_events: int = MAX_FUTURE_EVENTS,
) -> pd.DataFrame:
    """Per label row (same index as `labels`): FUTURE_COLUMNS, lists of int64, the events of
    the row's user with cut < timestamp <= cut + window, oldest first, at most `max_events`
    of them (evenly spaced when there are more)."""
    if window_seconds <= 0 or max_events <= 0:
        raise ValueError("future targets need a positive window and event cap")
    uid = events[USER_ID].to_numpy(dtype=np.int64)
    ts = timestamps_ns(events["event_timestamp"])
    order = np.lexsort((ts, uid))  # (user, time): each user's events are one sorted run
    uid, ts = uid[order], ts[order]
    values = {c: events[src].to_numpy(dtype=np.int64)[order] for c, src in TARGET_SOURCES.items()}

    row_uid = labels[USER_ID].to_numpy(dtype=np.int64)
    cut = timestamps_ns(labels[LABEL_TIMESTAMP])
    first = np.searchsorted(uid, row_uid, side="left")  # (R,) the user's run of events
    last = np.searchsorted(uid, row_uid, side="right")
    lo = np.empty(len(labels), dtype=np.int64)  # first event after the cut
    hi = np.empty(len(labels), dtype=np.int64)  # one past the last event inside the window
    window_ns = np.int64(window_seconds) * 1_000_000_000
    for t in np.unique(cut):  # few distinct cuts: one vectorised pass each
        rows = cut == t
        f, la = first[rows], last[rows]
        # within [first, last) the times are sorted: count events <= t and <= t + window
        after = np.concatenate([[0], np.cumsum(ts <= t)])
        inside = np.concatenate([[0], np.cumsum(ts <= t + window_ns)])
        lo[rows] = f + (after[la] - after[f])
        hi[rows] = f + (inside[la] - inside[f])

    n = hi - lo  # (R,) future events in the window
    kept = np.minimum(n, max_events)
    offsets = np.zeros(len(labels) + 1, dtype=np.int64)
    np.cumsum(kept, out=offsets[1:])
    row = np.repeat(np.arange(len(labels)), kept)  # (total,)
    k = np.arange(offsets[-1]) - offsets[:-1][row]  # position among the row's kept events
    # evenly spaced when there are more than max_events: k * n // max_events is increasing
    pos = lo[row] + np.where(n[row] > max_events, k * n[row] // max_events, k)
    cols = {c: v[pos] for c, v in values.items()}
    # ceil: a target strictly after the cut has offset >= 1, one inside the window <= window
    cols[FUTURE_OFFSETS] = -((cut[row] - ts[pos]) // 1_000_000_000)
    out = pd.DataFrame(index=labels.index)
    for c in FUTURE_COLUMNS:
        out[c] = np.split(cols[c], offsets[1:-1]) if len(labels) else []
    return out


def add_future_targets(
    events: pd.DataFrame, labels: pd.DataFrame, spec: DatasetSpec
) -> tuple[pd.DataFrame, DatasetSpec]:
    """(labels with FUTURE_COLUMNS, spec recording the window used): what `data build` writes.
    Benchmarks that assemble a frame without `data build` call this too."""
    window = future_window_seconds(spec)
    targets = future_targets(events, labels, window)
    n = targets[FUTURE_ITEMS].map(len)
    logger.info(
        "future targets: window %.1f days, %.1f%% of label rows with one, %.1f per row",
        window / 86400,
        100.0 * float((n > 0).mean()) if len(n) else 0.0,
        float(n.mean()) if len(n) else 0.0,
    )
    out = labels.drop(columns=[c for c in FUTURE_COLUMNS if c in labels.columns])
    return pd.concat([out, targets], axis=1), replace(spec, future_window_seconds=window)
