"""A team's own data: events, users and labels parquet files in the documented schema.

Everything is validated before anything is written: a missing column or a wrong type raises
SchemaError naming the file and the column.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from userembed.datasets.spec import DatasetSpec, iso, split_cuts, to_utc
from userembed.errors import DataNotFoundError, SchemaError
from userembed.features import DEFAULT_SEQUENCE_LENGTH, PROFILE_FEATURES
from userembed.schema import (
    EVENT_COLUMNS,
    EVENT_TIMESTAMP,
    LABEL_PREFIX,
    LABEL_TIMESTAMP,
    task_columns,
    validate_labels,
    validate_table,
    validate_users,
)

logger = logging.getLogger(__name__)


def _read(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"{path}: no such file")
    try:
        return pq.read_table(path).to_pandas()
    except (pa.ArrowInvalid, OSError) as e:
        raise SchemaError(str(path), "*", f"cannot be read as parquet: {e}") from e


def load_parquet(
    events_path: Path,
    users_path: Path,
    labels_path: Path,
    name: str = "parquet",
    horizon_seconds: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, DatasetSpec]:
    """Read and validate the three files; return (events, users, labels, spec).

    Profile features = the PROFILE_FEATURES columns present in the users file (absent ones are
    -1 = padding in the feature tables); cuts = the distinct label timestamps (newest test,
    second newest validation, the rest train).
    """
    events = _read(events_path)
    users = _read(users_path)
    labels = _read(labels_path)
    validate_table(events, EVENT_COLUMNS, str(events_path))
    if events.empty:  # the data window would start at NaT
        raise SchemaError(str(events_path), EVENT_TIMESTAMP, "has no rows: no behaviour to learn")
    profile = tuple(f for f in PROFILE_FEATURES if f in users.columns)
    validate_users(users, profile, str(users_path))
    validate_labels(labels, str(labels_path))
    events = events.assign(event_timestamp=pd.to_datetime(events["event_timestamp"], utc=True))
    labels = labels.assign(**{LABEL_TIMESTAMP: pd.to_datetime(labels[LABEL_TIMESTAMP], utc=True)})
    cuts = sorted(labels[LABEL_TIMESTAMP].unique())
    if not cuts:
        raise SchemaError(str(labels_path), LABEL_TIMESTAMP, "has no rows: no cut to train on")
    train, validation, test = split_cuts([to_utc(c) for c in cuts])
    if not (train and validation):
        logger.warning(
            "%s: %d label time(s) give no %s cut: `userembed train` needs at least 3 (the "
            "oldest train, the second newest validates, the newest tests)",
            labels_path,
            len(cuts),
            "validation" if train else "training",
        )
    start = min(events["event_timestamp"].min(), to_utc(cuts[0])).floor("D")
    end = max(events["event_timestamp"].max() + pd.Timedelta(seconds=1), to_utc(cuts[-1]))
    spec = DatasetSpec(
        name=name,
        tasks=tuple(c[len(LABEL_PREFIX) :] for c in task_columns(labels)),
        model_profile_features=profile,
        heldout_profile_features=(),
        train_cuts=train,
        validation_cuts=validation,
        test_cuts=test,
        data_start=iso(start),
        data_end=iso(end),
        label_horizon_seconds=horizon_seconds,
        sequence_length=DEFAULT_SEQUENCE_LENGTH,
        notes=f"events={events_path} users={users_path} labels={labels_path}",
    )
    logger.info(
        "parquet: %d users, %d events, %d label rows; profile features: %s; tasks: %s",
        len(users),
        len(events),
        len(labels),
        ", ".join(profile) or "none (the model has no profile input)",
        ", ".join(spec.tasks) or "none",
    )
    return events, users, labels, spec
