"""Online feature reads for the miss path, behind a narrow interface (`OnlineFeatureSource`).

The server only needs "feature columns for these users, which users exist, and how fresh their
features are"; the Feast implementation reads the model's Feast references (InputSpec) from the
Redis online store in one call per micro-batch. A model reads only the features its manifest's
InputSpec names: one exported without the long-term input is served from the same store.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import redis

from embed_server.errors import REDIS_OUTAGE, RedisReplyError, as_unavailable
from userembed.errors import FeatureMismatchError
from userembed.features import InputSpec
from userembed.ids import parse_user_id
from userembed.schema import USER_ID

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureRows:
    """Feature columns of a batch of users, in request order."""

    columns: dict[str, list[Any]]  # feature name -> one value per user (None: missing)
    found: list[bool]  # False: the feature store knows nothing of this user
    feature_ts_ms: list[int]  # newest event time of the user's features (epoch ms; 0 unknown)


class OnlineFeatureSource(Protocol):
    def fetch(self, user_ids: Sequence[str], spec: InputSpec) -> FeatureRows:
        """Read the features of `spec` for `user_ids` (canonical ids, userembed.ids). Raises
        BackendUnavailableError when the online store cannot be reached, RedisReplyError when
        it answers an error reply (a key of the wrong type: which user's is unknown),
        InvalidInputError for an id that is not canonical."""
        ...


class FeastFeatureSource:
    """Reads from the Feast repository's online store (Redis). Build once per process: the
    FeatureStore takes about 10 s to construct (shared/STACK.md)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    @classmethod
    def open(cls, redis_url: str, repo: str) -> FeastFeatureSource:
        from userembed.feast_ops import open_store  # heavy (feast): only servers that compute

        return cls(open_store(redis_url, Path(repo)))

    def fetch(self, user_ids: Sequence[str], spec: InputSpec) -> FeatureRows:
        entity_ids = [parse_user_id(u) for u in user_ids]
        try:
            resp = self.store.get_online_features(  # columnar entity rows: no dict per user
                features=spec.feast_refs(), entity_rows={USER_ID: entity_ids}
            )
        except REDIS_OUTAGE as e:
            raise as_unavailable("feature store", e) from e
        except redis.ResponseError as e:  # WRONGTYPE on an entity's hash: Redis is up
            raise RedisReplyError(f"feature store error reply: {e}") from e
        except KeyError as e:  # Feast: "Feature X not found in projection <view>"
            raise FeatureMismatchError(
                f"the feature store's registry lacks features the model reads ({e}): rebuild "
                "the data set, `userembed feast apply --fresh`, then materialise"
            ) from e
        rows = rows_from_response(resp.proto, spec.feature_names(), len(entity_ids))
        check_long_term_present(rows, spec)
        return rows


def check_long_term_present(rows: FeatureRows, spec: InputSpec) -> None:
    """A known user without long-term values has online rows written before the long-term
    features existed (Feast keeps an older row when a newer one has the same timestamp):
    encoding them as "no history" would serve silently different vectors, so refuse."""
    if spec.long_term is None:
        return
    for name in spec.long_term_names:
        missing = [i for i, v in enumerate(rows.columns[name]) if rows.found[i] and v is None]
        if missing:
            raise FeatureMismatchError(
                f"online feature rows lack {name} for {len(missing)} known user(s): they were "
                "materialised before the data set had long-term features; rebuild the data "
                "set, `userembed feast apply --fresh`, then materialise"
            )


def _value(v: Any) -> Any:
    """One Feast ValueProto -> Python: the two kinds the input schema uses read directly
    (`int64_list_val`, `int64_val`), anything else through Feast's own converter."""
    kind = v.WhichOneof("val")
    if kind == "int64_list_val":
        return list(v.int64_list_val.val)
    if kind == "int64_val":
        return v.int64_val
    if kind is None or kind == "null_val":
        return None
    from feast.type_map import feast_value_type_to_python_type

    return feast_value_type_to_python_type(v)


def rows_from_response(proto: Any, names: Sequence[str], n: int) -> FeatureRows:
    """A `GetOnlineFeaturesResponse` proto -> FeatureRows, read column by column; the same
    result as `OnlineResponse.to_dict()` (a test compares them), which dispatches every value
    through Feast's generic converter. A value that is not set is None (unknown user, null).
    Presence is read from the value, not from `statuses`: Feast 0.67 reports PRESENT for the
    empty values of an unknown user."""
    index = {name: i for i, name in enumerate(proto.metadata.feature_names.val)}
    columns: dict[str, list[Any]] = {}
    found = [False] * n
    ts = [0] * n
    for name in names:
        fv = proto.results[index[name]]
        col = [_value(v) for v in fv.values]
        columns[name] = col
        found = [f or v is not None for f, v in zip(found, col, strict=True)]
        seconds = [t.seconds for t in fv.event_timestamps]
        if len(seconds) == n:
            ts = [max(a, b) for a, b in zip(ts, seconds, strict=True)]
    return FeatureRows(columns=columns, found=found, feature_ts_ms=[t * 1000 for t in ts])
