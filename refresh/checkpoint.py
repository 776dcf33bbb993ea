"""Resume state of a refresh run, kept in Redis beside the embedding version it builds.

Everything lives in the version's metadata hash (`ue:{<model>}:ev:<version>`, see
userembed/vectors.py; on Redis Cluster in the model's slot, beside the lock and the pointer), so
`VectorStore.delete_version` removes it with the version and a Kubernetes CronJob needs no
volume:

    plan        JSON RunPlan: model version, mode, source fingerprint, part_rows, since_ms, ...
    part:<id>   JSON PartResult of a finished part (written after its vectors)
    mode, engine                                       set when a run starts or resumes
    watermark_ms, drift, seconds, compute_seconds, finished_at     set when the run completes

A part is marked done only after its vectors are written, so a run killed in between redoes
that part; vector writes are idempotent per key, so nothing is duplicated. A run's checkpoint
writes carry its fencing token (refresh/lock.py): Redis writes only while that token holds the
lock, so a run that stalled past its lock (a stopped process) never brings back a version the
next run's garbage collection removed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from refresh.errors import RefreshLockLostError
from refresh.lock import unless_token_holds
from userembed.vectors import STATUS_BUILDING, VectorStore

logger = logging.getLogger(__name__)

PLAN_FIELD = "plan"
# What a finished run records beside its parts (refresh/job.py writes, `userembed ui` reads).
DRIFT_FIELD = "drift"
SECONDS_FIELD = "seconds"
FINISHED_AT_FIELD = "finished_at"
MODE_FIELD = "mode"
ENGINE_FIELD = "engine"
WATERMARK_FIELD = "watermark_ms"
PART_PREFIX = "part:"

# KEYS: meta(version), refresh lock (one slot: {<model>}). ARGV: fencing token, then field,
# value pairs. Writes and returns 1 only while the token holds the lock; 0 otherwise.
_FENCED_HSET = (
    unless_token_holds("KEYS[2]", "ARGV[1]")
    + """
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""
)


@dataclass(frozen=True)
class PartResult:
    """What one part did; summed into the run's validation counters."""

    part_id: str
    users: int  # vectors now in the version for this part (computed + copied)
    computed: int
    copied: int  # unchanged users carried over from the previous version (incremental)
    nonfinite: int  # computed vectors holding NaN or inf
    min_norm: float
    max_norm: float
    max_feature_ts_ms: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> PartResult:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class RunPlan:
    """The identity of a run: a building version is resumed only when all of this matches."""

    model_version: str
    mode: str  # "full" | "incremental"
    fingerprint: str
    part_rows: int
    since_ms: int | None
    base_version: str | None  # the version unchanged users are copied from (incremental)
    users: int
    parts: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> RunPlan:
        return cls(**json.loads(text))


class Checkpoint:
    """Read and write one embedding version's resume state. `fence`: the writing run's
    fencing token (a reader leaves it 0 and writes nothing)."""

    def __init__(self, store: VectorStore, version: str, fence: int = 0) -> None:
        self.store = store
        self.version = version
        self.key = store.keys.meta(version)
        self.fence = fence

    def _write(self, mapping: Mapping[str, Any]) -> None:
        """HSET, refused with RefreshLockLostError once the run's token no longer holds the
        lock (checked by Redis in the same step as the write)."""
        pairs = [x for kv in mapping.items() for x in kv]
        lock = self.store.keys.refresh_lock
        if not self.store.r.eval(_FENCED_HSET, 2, self.key, lock, self.fence, *pairs):
            raise RefreshLockLostError(
                f"model {self.store.keys.model}: refresh lock (token {self.fence}) expired or "
                "was taken by another run; this run stops without writing its checkpoint"
            )

    def save_plan(self, plan: RunPlan) -> None:
        self._write({PLAN_FIELD: plan.to_json()})

    def load_plan(self) -> RunPlan | None:
        raw: Any = self.store.r.hget(self.key, PLAN_FIELD)  # sync client: bytes | None
        return RunPlan.from_json(raw) if raw else None

    def mark_done(self, result: PartResult) -> None:
        self._write({PART_PREFIX + result.part_id: result.to_json()})

    def done(self) -> dict[str, PartResult]:
        """Finished parts by id."""
        out = {}
        fields: Any = self.store.r.hgetall(self.key)
        for k, v in fields.items():
            name = k.decode()
            if name.startswith(PART_PREFIX):
                out[name[len(PART_PREFIX) :]] = PartResult.from_json(v)
        return out

    def set_fields(self, fields: Mapping[str, Any]) -> None:
        """Extra metadata (drift report, watermark, timings); dicts are stored as JSON."""
        self._write(
            {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in fields.items()}
        )

    def get_field(self, name: str) -> str | None:
        raw: Any = self.store.r.hget(self.key, name)
        return raw.decode() if raw is not None else None


def find_resumable(store: VectorStore, plan: RunPlan) -> str | None:
    """The newest version still `building` whose saved plan equals `plan`: a run that was
    killed (SIGKILL, node loss) before it finished. Failed versions are never resumed."""
    for info in reversed(store.list_versions()):
        if info.status != STATUS_BUILDING or info.model_version != plan.model_version:
            continue
        saved = Checkpoint(store, info.id).load_plan()
        if saved == plan:
            return info.id
    return None
