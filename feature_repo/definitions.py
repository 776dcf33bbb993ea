"""Feast objects of the platform: the user entity, two feature views, a push source, services.

Names come from userembed.features (the contract). FileSource paths are absolute, read from
USEREMBED_OFFLINE_DIR (default <USEREMBED_HOME>/offline) when this file is imported, i.e. at
`apply` time; userembed.snapshots writes the two parquet files there.
"""

from __future__ import annotations

from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource
from feast.types import Array, Int64
from feast.value_type import ValueType

from userembed import features as F
from userembed.paths import BEHAVIOR_FILE, PROFILE_FILE, offline_dir

_OFFLINE = offline_dir().resolve()

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)

behavior_source = FileSource(
    name="behavior_source",
    path=str(_OFFLINE / BEHAVIOR_FILE),
    timestamp_field="event_timestamp",
)
profile_source = FileSource(
    name="profile_source",
    path=str(_OFFLINE / PROFILE_FILE),
    timestamp_field="event_timestamp",
)
# Fresh behaviour is pushed online through this source; its batch source backs training.
user_behavior_push = PushSource(name="user_behavior_push", batch_source=behavior_source)

# ttl=0: no expiry. Rows are snapshots; the point-in-time join takes the newest one at or
# before the label time, which holds only events strictly before it. The long-term features
# live in the same rows: one join, one online hash, one file part for the refresh.
user_behavior = FeatureView(
    name=F.BEHAVIOR_VIEW,
    entities=[user],
    ttl=timedelta(0),
    schema=[Field(name=n, dtype=Array(Int64)) for n in F.SEQUENCE_FEATURES]
    + [Field(name=F.SEQ_LEN_FEATURE, dtype=Int64)]
    + [Field(name=n, dtype=Array(Int64)) for n in F.LONG_TERM_LIST_FEATURES]
    + [Field(name=n, dtype=Int64) for n in F.LONG_TERM_SCALAR_FEATURES],
    source=user_behavior_push,
    online=True,
)
user_profile = FeatureView(
    name=F.PROFILE_VIEW,
    entities=[user],
    ttl=timedelta(0),
    schema=[Field(name=n, dtype=Int64) for n in F.PROFILE_FEATURES],
    source=profile_source,
    online=True,
)

user_training_v1 = FeatureService(
    name=F.TRAINING_FEATURE_SERVICE, features=[user_behavior, user_profile]
)
user_serving_v1 = FeatureService(
    name=F.SERVING_FEATURE_SERVICE, features=[user_behavior, user_profile]
)
