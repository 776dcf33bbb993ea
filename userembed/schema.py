"""The documented input schema: events, users and labels tables.

Every source (synthetic generator, MovieLens-100K, a team's own parquet files) is mapped to
these three tables before anything else touches it. README.md ("Input schema") documents them;
keep both in step.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from userembed.errors import SchemaError

USER_ID = "user_id"
EVENT_TIMESTAMP = "event_timestamp"
LABEL_TIMESTAMP = "label_timestamp"
LABEL_PREFIX = "label_"


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "int" | "timestamp" | "float"
    doc: str


EVENT_COLUMNS: tuple[Column, ...] = (
    Column(USER_ID, "int", "user id, >= 0"),
    Column("item_id", "int", "item id, >= 0 (unbounded: hashed into the item table)"),
    Column("category_id", "int", "item category id, >= 0"),
    Column("event_type", "int", "event type code, >= 0 (e.g. view=0, click=1, cart=2, purchase=3)"),
    Column(EVENT_TIMESTAMP, "timestamp", "when the event happened (UTC)"),
)

# Users: user_id plus any number of int profile columns; which ones are model features is
# declared by the data set (DatasetSpec.profile_features), so some can be held out for probes.
USER_COLUMNS: tuple[Column, ...] = (Column(USER_ID, "int", "user id, >= 0"),)

LABEL_COLUMNS: tuple[Column, ...] = (
    Column(USER_ID, "int", "user id"),
    Column(LABEL_TIMESTAMP, "timestamp", "the cut: features use only events strictly before it"),
)


def task_columns(labels: pd.DataFrame) -> list[str]:
    """The task label columns of a labels table (`label_<task>`, 1.0/0.0, NaN = no label)."""
    return [c for c in labels.columns if c.startswith(LABEL_PREFIX) and c != LABEL_TIMESTAMP]


def _check_kind(series: pd.Series, kind: str) -> bool:
    if kind == "int":
        return pd.api.types.is_integer_dtype(series.dtype)
    if kind == "timestamp":
        return pd.api.types.is_datetime64_any_dtype(series.dtype)
    if kind == "float":
        return pd.api.types.is_float_dtype(series.dtype) or pd.api.types.is_integer_dtype(
            series.dtype
        )
    raise ValueError(kind)


def validate_table(df: pd.DataFrame, columns: tuple[Column, ...], source: str) -> None:
    """Raise SchemaError naming `source` and the first bad column; returns None when valid."""
    for col in columns:
        if col.name not in df.columns:
            raise SchemaError(source, col.name, f"is missing (expected {col.kind}: {col.doc})")
        if not _check_kind(df[col.name], col.kind):
            raise SchemaError(
                source, col.name, f"has type {df[col.name].dtype}, expected {col.kind}"
            )
        if col.kind == "int" and len(df) and int(df[col.name].min()) < 0:
            raise SchemaError(source, col.name, "has negative values")


def validate_users(df: pd.DataFrame, profile_features: tuple[str, ...], source: str) -> None:
    validate_table(
        df, USER_COLUMNS + tuple(Column(f, "int", "profile") for f in profile_features), source
    )


def validate_labels(df: pd.DataFrame, source: str) -> None:
    """user_id, label_timestamp and zero or more label_<task> columns: a labels file without
    tasks still names the cuts, and the model trains on its self-supervised objective alone."""
    validate_table(df, LABEL_COLUMNS, source)
    for t in task_columns(df):
        if not _check_kind(df[t], "float"):
            raise SchemaError(source, t, f"has type {df[t].dtype}, expected float (1/0/NaN)")
