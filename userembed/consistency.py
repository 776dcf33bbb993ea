"""Train/serve consistency for a sample of users (`userembed check`, the demo, each refresh).

The refresh computes vectors from the offline files (refresh/source.py); the server computes a
miss from the Feast online rows (embed_server/compute.py). Both must see the same features, or
a user's vector depends on which path answered. For a sample of the users of the offline
behaviour file (seeded: the same users each time) the check compares:

- each user's newest offline row of each view (ties: the last in file order, as the refresh
  reads it) with the user's online row: equal values, or a mismatch (no online row, or the
  features that differ). An online row newer than the file's (pushed since) is counted, not
  failed, and its user's vector is not compared.
- the stored vector in an embedding version (default: the one readers follow) with the served
  model's encoder run on the online row, as a FORCE_RECOMPUTE computes it: max |diff| within
  `atol`, plus the rounding of a vector stored as float16 (1 part in 2^10 of its largest
  component).
- each online view's offline file with the fingerprint `materialize` recorded
  (userembed.materialized): a file changed since is stale even where the sample saw no change.

    report = check(CheckConfig(model="supermoe"))      # report.ok, report.lines()

onnxruntime only (userembed.onnx_encoder), never torch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from userembed import feast_ops, paths, prerequisites
from userembed.errors import DataNotFoundError, FeatureMismatchError, InvalidInputError, SchemaError
from userembed.features import BEHAVIOR_VIEW, PROFILE_FEATURES, PROFILE_VIEW
from userembed.ids import format_user_ids
from userembed.materialized import MaterializedRecord, view_fingerprints
from userembed.redis_urls import open_redis, redacted
from userembed.registry import DEFAULT_MODEL, Registry
from userembed.schema import EVENT_TIMESTAMP, USER_ID
from userembed.vectors import StoredVector, VectorStore

if TYPE_CHECKING:
    from feast import FeatureStore

DEFAULT_SAMPLE = 200
SHOWN_MISMATCHES = 20  # the report lists this many; the counts cover every one

# float16 keeps 11 significant bits: rounding is within 2^-11 of a value, 2^-10 gives margin
F16_RELATIVE = 2.0**-10

NOT_ONLINE = "not online"
FEATURES = "features"
VECTOR = "vector"


@dataclass(frozen=True)
class CheckConfig:
    model: str = DEFAULT_MODEL
    embedding_version: str | None = None  # None: the version readers follow
    sample: int = DEFAULT_SAMPLE  # users of the offline behaviour file
    seed: int = 0
    atol: float = 1e-4  # max |stored - recomputed| per component (+ rounding of f16 vectors)
    intra_op_threads: int = 1
    registry_root: str = field(default_factory=paths.registry_root)
    redis_url: str = field(default_factory=paths.redis_url)
    offline_dir: str = field(default_factory=lambda: str(paths.offline_dir()))

    def __post_init__(self) -> None:
        if self.sample < 1 or self.atol <= 0:
            raise InvalidInputError("check: sample must be >= 1 and atol > 0")


@dataclass(frozen=True)
class Mismatch:
    user_id: str
    kind: str  # NOT_ONLINE, FEATURES or VECTOR
    detail: str


@dataclass(frozen=True)
class ConsistencyReport:
    model: str
    embedding_version: str | None  # None: no vector was compared (see vectors_note)
    model_version: str | None
    users: int  # sampled
    not_online: int  # users without an online row of a view they have offline
    feature_mismatches: int  # users whose online row differs from their newest offline row
    newer_online: int  # users with an online row newer than the file's (pushed): not compared
    vectors_checked: int
    vector_mismatches: int
    not_stored: int  # users without a vector in the embedding version (a miss computes them)
    max_abs_diff: float  # over the vectors checked
    stale_views: dict[str, str]  # view -> why its online rows may not come from its file now
    mismatches: tuple[Mismatch, ...]  # the first SHOWN_MISMATCHES
    seconds: float
    vectors_note: str = ""  # why vectors were not compared

    @property
    def ok(self) -> bool:
        return not (
            self.not_online or self.feature_mismatches or self.vector_mismatches or self.stale_views
        )

    def headline(self) -> str:
        """One line: the verdict and the figures."""
        verdict = "consistent" if self.ok else "MISMATCH"
        where = f"{self.model} @ {self.embedding_version or '-'}"
        vectors = (
            f"{self.vector_mismatches}/{self.vectors_checked} vectors differ from a recompute "
            f"(max |diff| {self.max_abs_diff:.1e}, {self.not_stored} not stored)"
            if self.embedding_version
            else f"vectors not compared ({self.vectors_note})"
        )
        stale = f", stale views: {', '.join(sorted(self.stale_views))}" if self.stale_views else ""
        return (
            f"check {where}: {verdict}: {self.users} users; {self.not_online} not online, "
            f"{self.feature_mismatches} online rows differ from the offline ones "
            f"({self.newer_online} newer online); {vectors}{stale} ({self.seconds:.1f}s)"
        )

    def lines(self) -> list[str]:
        """The headline, then one line per stale view and per listed mismatch."""
        out = [self.headline()]
        out += [
            f"  view {view}: {why}: run 'userembed feast materialize'"
            for view, why in sorted(self.stale_views.items())
        ]
        out += [f"  user {m.user_id}: {m.kind}: {m.detail}" for m in self.mismatches]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def check(cfg: CheckConfig, feature_store: FeatureStore | None = None) -> ConsistencyReport:
    """Compare online rows, offline rows and stored vectors for `cfg.sample` users (see the
    module doc). `feature_store`: an open FeatureStore to reuse (`feast_ops.open_store`)."""
    t0 = time.perf_counter()
    store = feature_store if feature_store is not None else feast_ops.open_store(cfg.redis_url)
    offline = Path(cfg.offline_dir)
    prerequisites.require_offline_tables(offline)
    behavior_file, profile_file = offline / paths.BEHAVIOR_FILE, offline / paths.PROFILE_FILE
    user_ids = sample_users(behavior_file, cfg.sample, cfg.seed)
    online, online_ts = feast_ops.online_features_at(store, user_ids.tolist())
    text_ids = format_user_ids(user_ids)
    views = {
        BEHAVIOR_VIEW: (
            behavior_file,
            _compared(behavior_file, feast_ops.BEHAVIOR_COLUMNS, online),
        ),
        PROFILE_VIEW: (profile_file, _compared(profile_file, PROFILE_FEATURES, online)),
    }
    rows = _compare_rows(views, user_ids, text_ids, online, online_ts)
    features = [col for name, col in online.items() if name != USER_ID]
    found = [any(col[i] is not None for col in features) for i in range(len(user_ids))]
    compare = [i for i in range(len(user_ids)) if found[i] and i not in rows.newer]
    vectors = _compare_vectors(cfg, online, text_ids, compare)
    mismatches = rows.mismatches + list(vectors.mismatches)
    stale = feast_ops.materialized_record(store).stale(
        view_fingerprints(v for v in store.list_feature_views() if v.online)
    )
    return ConsistencyReport(
        model=cfg.model,
        embedding_version=vectors.embedding_version,
        model_version=vectors.model_version,
        users=len(user_ids),
        not_online=len(rows.not_online),
        feature_mismatches=len(rows.differ),
        newer_online=len(rows.newer),
        vectors_checked=vectors.checked,
        vector_mismatches=vectors.differ,
        not_stored=vectors.not_stored,
        max_abs_diff=vectors.max_abs_diff,
        stale_views=stale,
        mismatches=tuple(sorted(mismatches, key=_by_user)[:SHOWN_MISMATCHES]),
        seconds=round(time.perf_counter() - t0, 3),
        vectors_note=vectors.note,
    )


@dataclass(frozen=True)
class _Rows:
    """Positions in the sample, by what their online rows showed."""

    not_online: set[int]
    differ: set[int]
    newer: set[int]
    mismatches: list[Mismatch]


def _compare_rows(
    views: dict[str, tuple[Path, list[str]]],
    user_ids: np.ndarray,
    text_ids: list[str],
    online: dict[str, list[Any]],
    online_ts: dict[str, list[int]],
) -> _Rows:
    """Each sampled user's online row of each view against its newest offline row."""
    mismatches: list[Mismatch] = []
    not_online: set[int] = set()
    differ: set[int] = set()
    newer: set[int] = set()
    for view, (path, names) in views.items():
        if not names:
            continue
        newest = newest_rows(path, user_ids, names)
        for i, uid in enumerate(user_ids.tolist()):
            on_s = online_ts[names[0]][i]
            row = newest.get(uid)
            if row is None:
                if on_s:  # an online row the files no longer have (an earlier data set's)
                    differ.add(i)
                    mismatches.append(Mismatch(text_ids[i], FEATURES, f"{view}: not offline"))
                continue
            off_s, values = row
            if not on_s:
                not_online.add(i)
                mismatches.append(Mismatch(text_ids[i], NOT_ONLINE, f"no {view} row online"))
            elif on_s > off_s:
                newer.add(i)
            else:
                diffs = [n for n in names if online[n][i] != values[n]]
                if diffs:
                    differ.add(i)
                    mismatches.append(
                        Mismatch(
                            text_ids[i], FEATURES, f"{view}: {_describe(diffs, online, i, values)}"
                        )
                    )
    return _Rows(not_online, differ, newer, mismatches)


def not_checkable(redis_url: str) -> str | None:
    """Why there are no online rows to check against (no Feast registry, or nothing
    materialised into this Redis), or None; cheap: neither Feast nor onnxruntime is loaded."""
    problem = prerequisites.feast_registry_problem()
    if problem:
        return problem
    client = open_redis(redis_url)
    try:
        if not MaterializedRecord(client, feast_ops.feast_project()).read():
            return f"nothing materialised into the Redis at {redacted(redis_url)}"
    finally:
        client.close()
    return None


def sample_users(behavior_file: Path, n: int, seed: int) -> np.ndarray:
    """Up to `n` distinct users of the behaviour file, drawn with `seed`, sorted (int64)."""
    users = np.unique(pq.read_table(behavior_file, columns=[USER_ID]).column(USER_ID).to_numpy())
    if len(users) > n:
        users = np.sort(np.random.default_rng(seed).choice(users, size=n, replace=False))
    return users.astype(np.int64)


def newest_rows(
    path: Path, user_ids: np.ndarray, names: Sequence[str]
) -> dict[int, tuple[int, dict[str, Any]]]:
    """user id -> (event time in epoch seconds, {feature: value}) of each user's newest row of
    `path` (ties: the last in file order); only the row groups holding those rows are read."""
    pf = pq.ParquetFile(path)
    keys = pf.read(columns=[USER_ID, EVENT_TIMESTAMP])
    uid = np.asarray(keys.column(USER_ID).to_numpy(), dtype=np.int64)
    ts_ns = _epoch_ns(keys.column(EVENT_TIMESTAMP), path)
    pos = np.nonzero(np.isin(uid, user_ids))[0]
    order = np.lexsort((pos, ts_ns[pos], uid[pos]))  # by user, time, then file position
    last = np.ones(len(order), dtype=bool)
    last[:-1] = uid[pos][order][1:] != uid[pos][order][:-1]
    rows = np.sort(pos[order][last])
    bounds = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
    out: dict[int, tuple[int, dict[str, Any]]] = {}
    for g in range(pf.num_row_groups):
        mine = rows[(rows >= bounds[g]) & (rows < bounds[g + 1])]
        if not len(mine):
            continue
        part = pf.read_row_group(g, columns=[USER_ID, *names]).take(pa.array(mine - bounds[g]))
        for r, at in zip(part.to_pylist(), ts_ns[mine].tolist(), strict=True):
            out[int(r.pop(USER_ID))] = (at // 1_000_000_000, r)
    return out


def _compared(path: Path, names: Sequence[str], online: dict[str, list[Any]]) -> list[str]:
    """The view's features that both the offline file and the online store have."""
    if not path.is_file():
        return []
    in_file = set(pq.read_schema(path).names)
    return [n for n in names if n in in_file and n in online]


def _by_user(m: Mismatch) -> tuple[int, str]:
    return int(m.user_id), m.kind


def _epoch_ns(col: pa.ChunkedArray, path: Path) -> np.ndarray:
    if not pa.types.is_timestamp(col.type):
        raise SchemaError(str(path), EVENT_TIMESTAMP, f"has type {col.type}, expected a timestamp")
    return np.asarray(col.cast(pa.timestamp("ns", col.type.tz)).cast(pa.int64()).to_numpy())


def _describe(diffs: Sequence[str], online: dict[str, list[Any]], i: int, row: dict) -> str:
    """The differing features; the first two with both values (short ones)."""
    shown = [f"{n} (online {_short(online[n][i])}, offline {_short(row[n])})" for n in diffs[:2]]
    more = f" and {len(diffs) - 2} more" if len(diffs) > 2 else ""
    return "differ: " + ", ".join(shown) + more


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class _Vectors:
    embedding_version: str | None
    model_version: str | None
    checked: int = 0
    differ: int = 0
    not_stored: int = 0
    max_abs_diff: float = 0.0
    mismatches: tuple[Mismatch, ...] = ()
    note: str = ""


def _compare_vectors(
    cfg: CheckConfig, online: dict[str, list[Any]], text_ids: list[str], compare: list[int]
) -> _Vectors:
    """Stored vectors of the users at `compare` against the served model on their online rows."""
    client = open_redis(cfg.redis_url)
    try:
        vstore = VectorStore(client, cfg.model)
        ev = cfg.embedding_version or vstore.current_version()
        if ev is None:
            return _Vectors(None, None, note=f"no embedding version of {cfg.model} serves yet")
        info = vstore.version_info(ev)
        if info is None:
            raise DataNotFoundError(f"no embedding version {ev} of {cfg.model} in Redis")
        stored = vstore.read(ev, [text_ids[i] for i in compare])
    finally:
        client.close()
    have = [(i, s) for i, s in zip(compare, stored, strict=True) if s is not None]
    if not have:
        return _Vectors(ev, info.model_version, not_stored=len(compare))
    recomputed = _recompute(cfg, info.model_version, online, [i for i, _ in have])  # (n, D)
    mismatches = []
    worst = 0.0
    for (i, s), again in zip(have, recomputed, strict=True):
        diff = float(np.max(np.abs(s.vector - again))) if s.vector.shape == again.shape else np.inf
        worst = max(worst, diff)
        rounding = F16_RELATIVE * float(np.max(np.abs(again))) if _stored_as_f16(s) else 0.0
        if diff > cfg.atol + rounding:
            mismatches.append(
                Mismatch(text_ids[i], VECTOR, f"stored vs recomputed max |diff| {diff:.2e}")
            )
    return _Vectors(
        ev,
        info.model_version,
        checked=len(have),
        differ=len(mismatches),
        not_stored=len(compare) - len(have),
        max_abs_diff=worst,
        mismatches=tuple(mismatches),
    )


def _recompute(
    cfg: CheckConfig, model_version: str, online: dict[str, list[Any]], rows: list[int]
) -> np.ndarray:
    """The served model (the embedding version's registry version) on the online rows."""
    from userembed.features import encode_inputs
    from userembed.onnx_encoder import OnnxEncoder

    loaded = Registry(cfg.registry_root).load_verified(cfg.model, model_version)
    try:
        manifest = loaded.manifest
        items = loaded.items()
        encoder = OnnxEncoder(
            loaded.session_source(), manifest.vector.dim, cfg.intra_op_threads, name=manifest.ref
        )
    finally:
        loaded.release()
    spec = manifest.input_spec
    absent = [n for n in spec.feature_names() if n not in online]
    if absent:
        raise FeatureMismatchError(
            f"the feature store's registry lacks features {absent} that {manifest.ref} reads: "
            "rebuild the data set, `userembed feast apply --fresh`, then materialise"
        )
    columns = {n: [online[n][i] for i in rows] for n in spec.feature_names()}
    return encoder.run(encode_inputs(columns, spec, items))


def _stored_as_f16(stored: StoredVector) -> bool:
    """A vector stored as float16 survives a float16 round trip exactly; a float32 one of any
    size practically never does (every component would have to fit 11 bits)."""
    v = stored.vector
    return bool(np.array_equal(v.astype(np.float16).astype(np.float32), v))
