"""A point-in-time join by pandas `merge_asof` over the offline parquet files: the reference.

Not the platform's path (that is Feast's `get_historical_features`, userembed/feast_ops.py):
the offline-store benchmark measures it beside the offline stores, the quality benchmark builds
its frames with it (no registry or Redis needed) and the tests check every offline store's
frame equals it. The rule is Feast's: per label row, the newest feature row at or before the
label time (ttl=0, exact matches included).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from userembed.datasets.spec import DatasetSpec
from userembed.feast_ops import BEHAVIOR_COLUMNS, entity_rows, frame_from_joined
from userembed.features import PROFILE_FEATURES
from userembed.paths import BEHAVIOR_FILE, PROFILE_FILE


def merge_asof_join(offline_dir: Path, entity: pd.DataFrame) -> pd.DataFrame:
    """Entity rows (feast_ops.entity_rows) joined to both offline files."""
    out = entity.sort_values("event_timestamp", kind="stable")
    out["event_timestamp"] = out["event_timestamp"].astype("datetime64[ns, UTC]")
    for name, cols in ((BEHAVIOR_FILE, BEHAVIOR_COLUMNS), (PROFILE_FILE, PROFILE_FEATURES)):
        feat = pd.read_parquet(offline_dir / name, columns=["user_id", "event_timestamp", *cols])
        feat["event_timestamp"] = pd.to_datetime(feat["event_timestamp"], utc=True).astype(
            "datetime64[ns, UTC]"
        )
        feat = feat.sort_values("event_timestamp", kind="stable")
        out = pd.merge_asof(
            out,
            feat,
            on="event_timestamp",
            by="user_id",
            direction="backward",
            allow_exact_matches=True,
        )
    return out


def merge_asof_frame(offline_dir: Path, labels: pd.DataFrame, spec: DatasetSpec) -> pd.DataFrame:
    """The trainer's frame (feast_ops.frame_from_joined) from the merge_asof join."""
    return frame_from_joined(merge_asof_join(offline_dir, entity_rows(labels)), labels, spec)
