"""The Feast feature store of the platform: open it once, apply, materialise, read.

`FeatureStore(...)` takes about 10 s to construct (shared/STACK.md): open it once per process
with `open_store` and pass it around. The repository is feature_repo/; its feature_store.yaml
takes the Redis connection string and the registry path from the environment, which
`open_store` fills from REDIS_URL and the workspace without touching os.environ.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import string
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse

import numpy as np
import pandas as pd
import redis
import yaml

from userembed import paths
from userembed.datasets.spec import DatasetSpec
from userembed.errors import BackendUnavailableError, InvalidInputError
from userembed.features import (
    LONG_TERM_FEATURES,
    LONG_TERM_LIST_FEATURES,
    PROFILE_FEATURES,
    SEQ_LEN_FEATURE,
    SEQUENCE_FEATURES,
    SERVING_FEATURE_SERVICE,
    TRAINING_FEATURE_SERVICE,
)
from userembed.future_targets import FUTURE_COLUMNS
from userembed.schema import LABEL_TIMESTAMP, task_columns

if TYPE_CHECKING:
    from feast import FeatureStore

logger = logging.getLogger(__name__)

PUSH_SOURCE = "user_behavior_push"
# The behaviour view's features, in its schema order; FEATURE_COLUMNS adds the profile ones.
BEHAVIOR_COLUMNS: tuple[str, ...] = (*SEQUENCE_FEATURES, SEQ_LEN_FEATURE, *LONG_TERM_FEATURES)
FEATURE_COLUMNS: tuple[str, ...] = (*BEHAVIOR_COLUMNS, *PROFILE_FEATURES)


def feast_registry_path() -> Path:
    """Feast's file registry: USEREMBED_FEAST_REGISTRY or <USEREMBED_HOME>/feast/registry.db."""
    return Path(os.environ.get("USEREMBED_FEAST_REGISTRY", paths.home() / "feast" / "registry.db"))


def redis_connection_string(redis_url: str) -> str:
    """redis://[:password@]host:port/db -> Feast's 'host:port,db=N[,password=..][,ssl=true]'."""
    u = urlparse(redis_url)
    if u.scheme not in ("redis", "rediss"):
        raise InvalidInputError(f"REDIS_URL must be redis:// or rediss://, got {redis_url!r}")
    db = (u.path or "/0").lstrip("/") or parse_qs(u.query).get("db", ["0"])[0]
    parts = [f"{u.hostname or '127.0.0.1'}:{u.port or 6379}", f"db={db}"]
    if u.password:
        parts.append(f"password={u.password}")
    if u.scheme == "rediss":
        parts.append("ssl=true")
    return ",".join(parts)


def _repo_config(redis_url: str, repo: Path) -> Any:
    from feast.repo_config import RepoConfig

    registry = feast_registry_path()
    registry.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "REDIS_CONNECTION_STRING": redis_connection_string(redis_url),
        "USEREMBED_FEAST_REGISTRY": str(registry),
    }
    text = string.Template((repo / "feature_store.yaml").read_text()).safe_substitute(env)
    config = RepoConfig(**yaml.safe_load(text))
    config.repo_path = repo
    return config


def open_store(redis_url: str | None = None, repo: Path | None = None) -> FeatureStore:
    """Construct the FeatureStore (slow: do it once per process)."""
    from feast import FeatureStore

    repo = repo or paths.FEATURE_REPO
    t0 = time.perf_counter()
    store = FeatureStore(
        repo_path=str(repo), config=_repo_config(redis_url or paths.redis_url(), repo)
    )
    logger.info("feature store opened from %s in %.1fs", repo, time.perf_counter() - t0)
    return store


def _definitions(repo: Path) -> list[Any]:
    """Import feature_repo/definitions.py afresh (its paths depend on the current env)."""
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    spec = importlib.util.spec_from_file_location(
        f"_feast_defs_{uuid.uuid4().hex}", repo / "definitions.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kinds = (Entity, FeatureView, FeatureService, DataSource)
    return [v for v in vars(module).values() if isinstance(v, kinds)]


def apply(store: FeatureStore, fresh: bool = False) -> list[str]:
    """Register the repository's objects (like `feast apply`); returns their names.

    fresh: first `feast teardown` (the project's online rows and registry entries), for a data
    set built from scratch. Feast's Redis store keeps the newer of two rows of a user, so the
    rows of an earlier data set with later timestamps (the synthetic data are dated 2026,
    MovieLens 1998) would shadow the new ones, and the server would compute from them. Vectors
    (`ue:*` keys) are not Feast's and stay."""
    objects = _definitions(Path(store.repo_path))
    if fresh:
        try:
            store.teardown()
        except redis.exceptions.ConnectionError as e:
            raise BackendUnavailableError(f"feast teardown: Redis unavailable: {e}") from e
        logger.info("feast teardown: online rows of the earlier data set dropped")
    store.apply(objects)
    names = sorted(o.name for o in objects)
    logger.info("feast apply: %s", ", ".join(names))
    return names


def materialize(store: FeatureStore, end: datetime | None = None) -> datetime:
    """Load the newest snapshot of every user into Redis (rows up to `end`, default now)."""
    end = end or datetime.now(UTC)
    t0 = time.perf_counter()
    try:
        store.materialize(start_date=datetime(1970, 1, 2, tzinfo=UTC), end_date=end)
    except redis.exceptions.ConnectionError as e:
        raise BackendUnavailableError(f"materialize: Redis unavailable: {e}") from e
    logger.info("materialized up to %s in %.1fs", end.isoformat(), time.perf_counter() - t0)
    return end


# Above this many label rows `training_frame(engine="auto")` joins directly (see below).
FEAST_JOIN_MAX_ROWS = 20_000


def training_frame(
    store: FeatureStore, labels: pd.DataFrame, spec: DatasetSpec, engine: str = "auto"
) -> pd.DataFrame:
    """Labels joined point-in-time to the features: the frame the trainer consumes.

    Columns: user_id, label_timestamp, split, label_<task>..., the future targets when the
    labels carry them, the sequence features (lists), seq_len, the long-term features (lists
    and ints; None where a row is missing) and the profile ints; sorted by
    (label_timestamp, user_id). Labels at a time that is not one of the spec's cuts are dropped.

    engine: "feast" = store.get_historical_features with the training feature service;
    "direct" = the same point-in-time rule (newest feature row at or before the label time,
    no TTL) as a pandas merge_asof over the views' own batch source files, because Feast's
    dask file offline store needs minutes beyond ~100k rows on 2 cores; tests check both give
    the same frame. "auto" = feast up to FEAST_JOIN_MAX_ROWS label rows, direct above.
    """
    tasks = task_columns(labels)
    # Future targets (userembed.future_targets) ride as extra entity columns, never features.
    future = [c for c in FUTURE_COLUMNS if c in labels.columns]
    entity = labels[["user_id", LABEL_TIMESTAMP, *tasks, *future]].rename(
        columns={LABEL_TIMESTAMP: "event_timestamp"}
    )
    entity["event_timestamp"] = pd.to_datetime(entity["event_timestamp"], utc=True)
    if engine == "auto":
        engine = "feast" if len(entity) <= FEAST_JOIN_MAX_ROWS else "direct"
    t0 = time.perf_counter()
    if engine == "feast":
        job = store.get_historical_features(
            entity_df=entity, features=store.get_feature_service(TRAINING_FEATURE_SERVICE)
        )
        df = job.to_df()
    elif engine == "direct":
        df = _direct_join(store, entity)
    else:
        raise InvalidInputError(f"engine must be auto, feast or direct, got {engine!r}")
    df = df.rename(columns={"event_timestamp": LABEL_TIMESTAMP})
    df["split"] = spec.split_of(df[LABEL_TIMESTAMP]).to_numpy()
    df = df[df["split"].notna()]
    for f in SEQUENCE_FEATURES:  # Feast hands back numpy arrays (or NaN for a missing row)
        df[f] = [list(v) if isinstance(v, list | np.ndarray) else [] for v in df[f]]
    for f in LONG_TERM_LIST_FEATURES:
        df[f] = [list(v) if isinstance(v, list | np.ndarray) else None for v in df[f]]
    cols = ["user_id", LABEL_TIMESTAMP, "split", *tasks, *future, *FEATURE_COLUMNS]
    out = df[cols].sort_values([LABEL_TIMESTAMP, "user_id"], ignore_index=True)
    logger.info("training frame (%s): %d rows in %.1fs", engine, len(out), time.perf_counter() - t0)
    return out


def _direct_join(store: FeatureStore, entity: pd.DataFrame) -> pd.DataFrame:
    """Point-in-time join of entity rows (user_id, event_timestamp) to both views' files."""
    from userembed.features import BEHAVIOR_VIEW, PROFILE_VIEW

    out = entity.sort_values("event_timestamp", kind="stable")
    out["event_timestamp"] = out["event_timestamp"].astype("datetime64[ns, UTC]")
    for view, cols in (
        (BEHAVIOR_VIEW, list(BEHAVIOR_COLUMNS)),
        (PROFILE_VIEW, list(PROFILE_FEATURES)),
    ):
        source = store.get_feature_view(view).batch_source
        path = getattr(source, "path", None)
        if path is None:
            raise InvalidInputError(f"direct join needs a file batch source for {view}")
        feat = pd.read_parquet(path, columns=["user_id", "event_timestamp", *cols])
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


def online_features(store: FeatureStore, user_ids: Sequence[int]) -> dict[str, list[Any]]:
    """Serving features from Redis through Feast: bare feature names -> one value per user."""
    rows = [{"user_id": int(u)} for u in user_ids]
    try:
        result = store.get_online_features(
            features=store.get_feature_service(SERVING_FEATURE_SERVICE), entity_rows=rows
        ).to_dict()
    except redis.exceptions.ConnectionError as e:
        raise BackendUnavailableError(f"online features: Redis unavailable: {e}") from e
    return {k.split("__")[-1]: v for k, v in result.items()}


def push_behavior(store: FeatureStore, rows: pd.DataFrame) -> None:
    """Write fresh behaviour rows online: user_id, event_timestamp and every feature of the
    view (sequences, seq_len, long-term features), since a pushed row replaces the user's
    whole online row of the view."""
    from feast.data_source import PushMode

    missing = [c for c in ("user_id", "event_timestamp", *BEHAVIOR_COLUMNS) if c not in rows]
    if missing:
        raise InvalidInputError(f"push_behavior: missing columns {missing}")
    df = rows.copy()
    df["event_timestamp"] = pd.to_datetime(df["event_timestamp"], utc=True)
    store.push(PUSH_SOURCE, df, to=PushMode.ONLINE)
