"""The Feast feature store of the platform: open it once, apply, materialise, read.

`FeatureStore(...)` takes about 10 s to construct (shared/STACK.md): open it once per process
with `open_store` and pass it around. The repository is feature_repo/; its feature_store.yaml
(DuckDB offline store) or, with USEREMBED_FEAST_CONFIG=feature_store.ray.yaml, the Ray one
(docs/data.md, "Offline stores") takes the Redis connection string and the registry path from
the environment, which `open_store` fills from REDIS_URL and the workspace without touching
os.environ.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import string
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
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
from userembed.materialized import MaterializedRecord, view_fingerprints
from userembed.redis_urls import is_cluster, node_url, redacted
from userembed.schema import LABEL_TIMESTAMP, task_columns

if TYPE_CHECKING:
    from feast import FeatureStore

logger = logging.getLogger(__name__)

PUSH_SOURCE = "user_behavior_push"
# The behaviour view's features, in its schema order; FEATURE_COLUMNS adds the profile ones.
BEHAVIOR_COLUMNS: tuple[str, ...] = (*SEQUENCE_FEATURES, SEQ_LEN_FEATURE, *LONG_TERM_FEATURES)
FEATURE_COLUMNS: tuple[str, ...] = (*BEHAVIOR_COLUMNS, *PROFILE_FEATURES)


# The feature_store.yaml that `open_store` loads: a file name in the repository (or a path).
FEAST_CONFIG_ENV = "USEREMBED_FEAST_CONFIG"
DEFAULT_FEAST_CONFIG = "feature_store.yaml"  # DuckDB offline store: one machine
RAY_FEAST_CONFIG = "feature_store.ray.yaml"  # Ray offline store: a Ray cluster (RAY_ADDRESS)


def feature_store_yaml(repo: Path) -> Path:
    """The repository's configuration in use: $USEREMBED_FEAST_CONFIG, default feature_store.yaml."""
    return repo / os.environ.get(FEAST_CONFIG_ENV, DEFAULT_FEAST_CONFIG)


def feast_project(repo: Path | None = None) -> str:
    """The repository's Feast project name (feature_store.yaml), read without Feast."""
    config = yaml.safe_load(feature_store_yaml(repo or paths.FEATURE_REPO).read_text())
    return str(config["project"])


def feast_registry_path() -> Path:
    """Feast's file registry: USEREMBED_FEAST_REGISTRY or <USEREMBED_HOME>/feast/registry.db."""
    return Path(os.environ.get("USEREMBED_FEAST_REGISTRY", paths.home() / "feast" / "registry.db"))


# Socket timeouts of Feast's Redis client (the URL's socket_connect_timeout / socket_timeout
# options win): a stalled Redis fails a feature read instead of holding a compute thread.
FEAST_CONNECT_TIMEOUT_S = 2.0
FEAST_REPLY_TIMEOUT_S = 5.0


def _feast_value(text: str) -> str:
    """A connection-string value Feast reads back unchanged: it splits on ',' and JSON-decodes
    each value, so a JSON string with its commas escaped round-trips any password."""
    return json.dumps(text).replace(",", "\\u002c")


def redis_connection_string(redis_url: str) -> str:
    """redis://[user:password@]host:port/db (user and password URL-encoded) -> Feast's
    'host:port,db=N,socket_timeout=..[,username=..,password=..][,ssl=true]'. A cluster URL
    (redis+cluster://seed:port) gives the seed node and no db (`feast_online_store_type`)."""
    u = urlparse(node_url(redis_url))
    if u.scheme not in ("redis", "rediss"):
        raise InvalidInputError(
            "REDIS_URL must be redis://, rediss://, redis+cluster:// or rediss+cluster://, "
            f"got {redacted(redis_url)!r}"
        )
    query = parse_qs(u.query)
    db = (u.path or "/0").lstrip("/") or query.get("db", ["0"])[0]
    connect = query.get("socket_connect_timeout", [FEAST_CONNECT_TIMEOUT_S])[0]
    reply = query.get("socket_timeout", [FEAST_REPLY_TIMEOUT_S])[0]
    cluster = is_cluster(redis_url)
    if cluster and int(db) != 0:
        raise InvalidInputError(f"a Redis Cluster has only db 0, got {redacted(redis_url)!r}")
    parts = [
        f"{u.hostname or '127.0.0.1'}:{u.port or 6379}",
        *([] if cluster else [f"db={int(db)}"]),  # cluster nodes refuse SELECT
        f"socket_connect_timeout={float(connect)}",
        f"socket_timeout={float(reply)}",
    ]
    if u.username:
        parts.append(f"username={_feast_value(unquote(u.username))}")
    if u.password:
        parts.append(f"password={_feast_value(unquote(u.password))}")
    if u.scheme == "rediss":
        parts.append("ssl=true")
    return ",".join(parts)


def feast_online_store_type(redis_url: str) -> str:
    """Feast's `redis_type` of the online store: `redis_cluster` for a cluster URL."""
    return "redis_cluster" if is_cluster(redis_url) else "redis"


def _repo_config(redis_url: str, repo: Path) -> Any:
    from feast.repo_config import RepoConfig

    registry = feast_registry_path()
    try:
        registry.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a reader's read-only workspace (server, refresh): `feast apply` makes it
        logger.debug("feast registry folder %s not created (%s)", registry.parent, e)
    env = {
        **os.environ,
        # a YAML double-quoted scalar: a password may hold ': ' or ' #'
        "REDIS_CONNECTION_STRING": json.dumps(redis_connection_string(redis_url)),
        "USEREMBED_FEAST_REGISTRY": str(registry),
    }
    text = string.Template(feature_store_yaml(repo).read_text()).safe_substitute(env)
    data = yaml.safe_load(text)
    online = data.get("online_store") or {}
    if online.get("type") == "redis":  # one server or a cluster: the URL says (redis_urls.py)
        online["redis_type"] = feast_online_store_type(redis_url)
    config = RepoConfig(**data)
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
    bound_redis_waits(store._get_provider().online_store, store.config.online_store)
    logger.info("feature store opened from %s in %.1fs", repo, time.perf_counter() - t0)
    return store


def bound_redis_waits(online_store: Any, online_config: Any) -> None:
    """Feast's redis-py client retries a timed-out command 3 times with backoff (about four
    socket timeouts and 7 s more): without retries one socket timeout bounds a stalled Redis,
    and the caller, who knows its deadline, decides whether to try again."""
    from feast.infra.online_stores.redis import RedisOnlineStore
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    if isinstance(online_store, RedisOnlineStore):
        online_store._get_client(online_config).set_retry(Retry(NoBackoff(), 0))


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

    fresh: first `feast teardown` (the project's online rows and registry entries) and forget
    what they were materialised from, for a data set built from scratch: `materialize` writes
    over the rows of the users a changed file has, but the users the new data set lacks would
    keep the earlier one's rows, and the server would compute from them. Vectors (`ue:*` keys)
    are not Feast's and stay."""
    objects = _definitions(Path(store.repo_path))
    if fresh:
        try:
            store.teardown()
            materialized_record(store).clear()  # no rows left that came from any file
        except redis.exceptions.ConnectionError as e:
            raise BackendUnavailableError(f"feast teardown: Redis unavailable: {e}") from e
        logger.info("feast teardown: online rows of the earlier data set dropped")
    store.apply(objects)
    names = sorted(o.name for o in objects)
    logger.info("feast apply: %s", ", ".join(names))
    return names


def materialize(store: FeatureStore, end: datetime | None = None) -> datetime:
    """Load the newest snapshot of every user into Redis (rows up to `end`, default now).

    The offline store picks each user's newest row (`materialization.pull_latest_features` in
    feature_store.yaml) and Feast writes them in batches; the rows written are logged as they
    go (done/total, rate, ETA). Feast keeps a stored row over a new one with the same event
    timestamp, so a view whose offline file changed since its rows were written (or with no
    record of it: userembed.materialized) has every row written over the old ones, and a line
    says why; the other views keep Feast's newer-row rule (a row pushed since stays)."""
    end = end or datetime.now(UTC)
    t0 = time.perf_counter()
    views = [v for v in store.list_feature_views() if v.online]
    # Fingerprints first: a file replaced while Feast reads it leaves the older fingerprint
    # recorded, and the next materialise writes its rows again.
    fingerprints = view_fingerprints(views)
    record = materialized_record(store)
    try:
        stale = record.stale(fingerprints)
    except redis.exceptions.ConnectionError as e:
        raise BackendUnavailableError(f"materialize: Redis unavailable: {e}") from e
    for view in views:
        if view.name in stale:
            logger.info(
                "materialize %s: %s: writing every row over the online ones, equal event "
                "timestamps included",
                view.name,
                stale[view.name],
            )
        elif fingerprints[view.name] is None:
            logger.warning(
                "materialize %s: its offline source is not a local file, so a change cannot "
                "be seen: a stored row stays over a new one with the same event timestamp",
                view.name,
            )
    counts = [_rows_to_write(v, end) for v in views]
    progress = WriteProgress(None if None in counts else sum(c or 0 for c in counts))
    # Feast's engines write through this instance and report no progress: count its writes.
    online = store._get_provider().online_store
    online.online_write_batch = progress.counting(online.online_write_batch)  # type: ignore[method-assign]
    start = datetime(1970, 1, 2, tzinfo=UTC)
    replace = [v.name for v in views if v.name in stale]
    keep = [v.name for v in views if v.name not in stale]
    try:
        if replace:
            with _overwriting(store):
                store.materialize(start_date=start, end_date=end, feature_views=replace)
        if keep:
            store.materialize(start_date=start, end_date=end, feature_views=keep)
        record.write({k: v for k, v in fingerprints.items() if v is not None})
    except redis.exceptions.ConnectionError as e:
        raise BackendUnavailableError(f"materialize: Redis unavailable: {e}") from e
    finally:
        del online.online_write_batch  # back to the class's method
    logger.info(
        "materialized %d rows of %d views (%d written over) up to %s in %.1fs",
        progress.done,
        len(views),
        len(replace),
        end.isoformat(),
        time.perf_counter() - t0,
    )
    return end


def materialized_record(store: FeatureStore) -> MaterializedRecord:
    """What the project's online rows came from, kept in the online store's Redis (through
    Feast's own client: one server or a cluster)."""
    online: Any = store._get_provider().online_store  # RedisOnlineStore (feature_store.yaml)
    return MaterializedRecord(online._get_client(store.config.online_store), store.project)


@contextmanager
def _overwriting(store: FeatureStore) -> Iterator[None]:
    """Feast's Redis store writes every row for the duration (`skip_dedup`: no check against
    the stored row's timestamp). Safe with `pull_latest_features`: one row per user."""
    config = store.config.online_store
    before = config.skip_dedup
    config.skip_dedup = True
    try:
        yield
    finally:
        config.skip_dedup = before


def _rows_to_write(view: Any, end: datetime) -> int | None:
    """Users with a row at or before `end` in a view's parquet batch source (None: not a
    local file), i.e. the rows its materialisation writes."""
    path = Path(getattr(view.batch_source, "path", "") or "")
    if not path.is_file():
        return None
    ts = view.batch_source.timestamp_field
    table = pq.read_table(path, columns=["user_id", ts], filters=[(ts, "<=", pd.Timestamp(end))])
    return int(pc.count_distinct(table["user_id"]).as_py())


class WriteProgress:
    """Rows written online so far against the total: one log line every `every_s` seconds.
    The rate counts from the first write (reading the offline rows comes before it)."""

    def __init__(self, total: int | None, every_s: float = 5.0) -> None:
        self.total = total
        self.done = 0
        self.every_s = every_s
        self._first: float | None = None
        self._last = time.perf_counter()

    def counting(self, write: Any) -> Any:
        """`write` (an online store's online_write_batch) that also counts its rows."""

        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._first is None:
                self._first = time.perf_counter()
            out = write(*args, **kwargs)
            data = kwargs["data"] if "data" in kwargs else args[2]
            self.add(len(data))
            return out

        return counted

    def add(self, rows: int) -> None:
        self.done += rows
        now = time.perf_counter()
        if now - self._last < self.every_s and self.done != self.total:
            return
        self._last = now
        rate = self.done / max(now - (self._first or now), 1e-9)
        if self.total:
            eta = max(self.total - self.done, 0) / max(rate, 1e-9)
            logger.info(
                "materialize: %d/%d rows (%.0f%%), %.0f rows/s, ETA %.0fs",
                self.done,
                self.total,
                100 * self.done / self.total,
                rate,
                eta,
            )
        else:
            logger.info("materialize: %d rows, %.0f rows/s", self.done, rate)


# The label row's position in the labels table: the one column the join carries beside the keys.
LABEL_ROW = "label_row"


def entity_rows(labels: pd.DataFrame) -> pd.DataFrame:
    """The labels as Feast's entity dataframe: user_id, event_timestamp (the label time, UTC)
    and label_row. The task labels and future targets stay out of the join (the stores carry
    extra entity columns through every step) and are taken back by label_row."""
    return pd.DataFrame(
        {
            "user_id": labels["user_id"].to_numpy(),
            "event_timestamp": pd.to_datetime(labels[LABEL_TIMESTAMP], utc=True).to_numpy(),
            LABEL_ROW: np.arange(len(labels), dtype=np.int64),
        }
    ).astype({"event_timestamp": "datetime64[ns, UTC]"})


def training_frame(store: FeatureStore, labels: pd.DataFrame, spec: DatasetSpec) -> pd.DataFrame:
    """Labels joined point-in-time to the features: the frame the trainer consumes.

    One path for every size: `get_historical_features` with the training feature service,
    computed by the configured offline store (DuckDB in-process by default, Ray on a cluster;
    docs/data.md). The rule: per label row, the newest feature row at or before the label time
    (ttl=0: no expiry). Columns: see `frame_from_joined`.
    """
    t0 = time.perf_counter()
    joined = store.get_historical_features(
        entity_df=entity_rows(labels),
        features=store.get_feature_service(TRAINING_FEATURE_SERVICE),
    ).to_df()
    out = frame_from_joined(joined, labels, spec)
    logger.info(
        "training frame (%s offline store): %d rows in %.1fs",
        store.config.offline_store.type,
        len(out),
        time.perf_counter() - t0,
    )
    return out


def frame_from_joined(
    joined: pd.DataFrame, labels: pd.DataFrame, spec: DatasetSpec
) -> pd.DataFrame:
    """`entity_rows(labels)` joined to the features -> the trainer's frame.

    Columns: user_id, label_timestamp, split, label_<task>..., the future targets when the
    labels carry them, the sequence features (int64 arrays, empty where a row is missing),
    seq_len, the long-term features (arrays and ints; None where a row is missing) and the
    profile ints; sorted by (label_timestamp, user_id). Rows at a time that is not one of the
    spec's cuts are dropped. Cells stay the arrays the join returns: Python lists of 1M rows
    would take several GiB more.
    """
    carried = [LABEL_TIMESTAMP, *task_columns(labels)]
    carried += [c for c in FUTURE_COLUMNS if c in labels.columns]
    rows = joined[LABEL_ROW].to_numpy()
    df = labels[carried].iloc[rows].reset_index(drop=True)
    df[LABEL_TIMESTAMP] = pd.to_datetime(df[LABEL_TIMESTAMP], utc=True)
    df.insert(0, "user_id", joined["user_id"].to_numpy())
    df.insert(2, "split", spec.split_of(df[LABEL_TIMESTAMP]).to_numpy())
    keep = df["split"].notna().to_numpy()
    features = joined.loc[keep, list(FEATURE_COLUMNS)].reset_index(drop=True)
    df = pd.concat([df[keep].reset_index(drop=True), features], axis=1)
    empty = np.zeros(0, dtype=np.int64)
    for f in SEQUENCE_FEATURES:  # the stores give an array per row, or NaN / None if none
        df[f] = [v if isinstance(v, np.ndarray) else _ids(v, empty) for v in df[f]]
    for f in LONG_TERM_LIST_FEATURES:
        df[f] = [v if isinstance(v, np.ndarray) else _ids(v, None) for v in df[f]]
    return df.sort_values([LABEL_TIMESTAMP, "user_id"], ignore_index=True)


def _ids(value: Any, missing: np.ndarray | None) -> np.ndarray | None:
    """A list cell that is not an array: a list (-> int64 array) or a missing row."""
    return np.asarray(value, dtype=np.int64) if isinstance(value, list) else missing


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


def online_features_at(
    store: FeatureStore, user_ids: Sequence[int]
) -> tuple[dict[str, list[Any]], dict[str, list[int]]]:
    """`online_features`, and each feature's event time per user (epoch seconds, as Feast
    returns them; 0 where the user has no online row of the feature's view)."""
    rows = [{"user_id": int(u)} for u in user_ids]
    try:
        result = store.get_online_features(
            features=store.get_feature_service(SERVING_FEATURE_SERVICE), entity_rows=rows
        ).to_dict(include_event_timestamps=True)
    except redis.exceptions.ConnectionError as e:
        raise BackendUnavailableError(f"online features: Redis unavailable: {e}") from e
    values = {k: v for k, v in result.items() if not k.endswith(_TS_SUFFIX)}
    times = {k[: -len(_TS_SUFFIX)]: v for k, v in result.items() if k.endswith(_TS_SUFFIX)}
    return values, times


_TS_SUFFIX = "__ts"  # OnlineResponse.to_dict(include_event_timestamps=True): "<feature>__ts"


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
