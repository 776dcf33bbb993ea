"""The read step of a refresh: bulk reads of the offline feature files (no Feast, no online
store), split into the parts the run checkpoints.

The Feast offline store keeps one parquet file per feature view (`userembed.paths.offline_dir()`,
written by userembed/snapshots.py):

    behavior.parquet   user_id int64, event_timestamp, item_seq/category_seq/... list<int64>,
                       the long-term features lt_* (list<int64> and int64)
    profile.parquet    user_id int64, event_timestamp, age_bucket/gender/... int64

A user may have several rows (one per snapshot); the refresh uses the latest row of each user,
as `get_online_features` would after materialisation. `plan` reads only the user_id and
timestamp columns of behavior.parquet to pick those rows and split the file into parts of at
most `part_rows` consecutive file rows (never across a row group), so parts are fixed by the
file alone: a killed run finds the same parts again. `read_part` then streams one part's record
batch (bounded memory) and joins the profile, which is small and held whole (about 40 MB for
1M users). Only the columns the model's InputSpec names are read: a model without the
long-term input reads none of them. Users with a profile but no behaviour row get no vector
from the batch job (the server computes them on a miss).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from userembed.errors import DataNotFoundError, SchemaError
from userembed.features import InputSpec
from userembed.ids import format_user_ids
from userembed.schema import EVENT_TIMESTAMP, USER_ID
from userembed.snapshots import BEHAVIOR_FILE, PROFILE_FILE

logger = logging.getLogger(__name__)

FEATURE_TS = "feature_ts_ms"  # column added by read_part: max(behaviour ts, profile ts), ms


def timestamps_ms(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A parquet timestamp column (any unit, any zone) or int64 epoch ms -> int64 epoch ms."""
    if pa.types.is_timestamp(arr.type):
        return (
            np.asarray(arr.to_numpy(zero_copy_only=False)).astype("datetime64[ms]").astype(np.int64)
        )
    if pa.types.is_integer(arr.type):
        return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.int64)
    raise SchemaError("offline", EVENT_TIMESTAMP, f"has type {arr.type}, expected a timestamp")


def latest_rows(user_ids: np.ndarray, ts_ms: np.ndarray) -> np.ndarray:
    """Row positions of each user's latest row (ties: the last one in file order), sorted."""
    order = np.lexsort((ts_ms, user_ids))  # stable: by user, then time, then file position
    uid = user_ids[order]
    last = np.ones(len(uid), dtype=bool)
    last[:-1] = uid[1:] != uid[:-1]
    return np.sort(order[last])


@dataclass(frozen=True)
class Part:
    """One checkpointed unit: `index`-th slice of `part_rows` rows in row group `row_group`."""

    id: str  # "<row_group>.<index>": stable for a given file and part_rows
    row_group: int
    index: int
    rows: np.ndarray  # (U,) int64 positions, within the slice, of the users' latest rows
    changed: np.ndarray  # (U,) bool: feature row newer than the incremental watermark


@dataclass(frozen=True)
class SourcePlan:
    fingerprint: str  # sha256 of the two files' sizes, row counts and row groups
    part_rows: int
    parts: tuple[Part, ...]
    users: int  # users that will have a vector in the new version
    changed: int  # of them, users whose features are newer than `since_ms` (all when full)
    watermark_ms: int  # newest feature timestamp among the users: the next run's `since_ms`
    since_ms: int | None
    # forgotten users (userembed/forget.py) left out of the plan that the files still hold
    held_forgotten: tuple[str, ...] = ()


class ProfileTable:
    """Latest profile row per user, sorted by user id, for vectorised joins."""

    def __init__(self, path: Path, names: Sequence[str]) -> None:
        self.names = tuple(names)
        if not path.exists():
            if self.names:
                raise DataNotFoundError(f"{path} not found (the model uses {list(self.names)})")
            self.user_ids = np.zeros(0, dtype=np.int64)
            self.ts_ms = np.zeros(0, dtype=np.int64)
            self.columns: dict[str, pa.Array] = {}
            return
        schema = pq.read_schema(path)
        for c in (USER_ID, EVENT_TIMESTAMP, *self.names):
            if c not in schema.names:
                raise SchemaError(str(path), c, "is missing")
        t = pq.read_table(path, columns=[USER_ID, EVENT_TIMESTAMP, *self.names])
        uid = np.asarray(t.column(USER_ID).to_numpy(), dtype=np.int64)
        ts = timestamps_ms(t.column(EVENT_TIMESTAMP))
        keep = latest_rows(uid, ts)
        order = keep[np.argsort(uid[keep], kind="stable")]
        self.user_ids = uid[order]
        self.ts_ms = ts[order]
        idx = pa.array(order)
        self.columns = {n: t.column(n).take(idx).combine_chunks() for n in self.names}

    def lookup(self, user_ids: np.ndarray) -> tuple[dict[str, pa.Array], np.ndarray]:
        """Profile columns for `user_ids` (null where unknown) and their timestamps (0)."""
        pos = np.searchsorted(self.user_ids, user_ids)
        pos = np.minimum(pos, max(len(self.user_ids) - 1, 0))
        found = (
            self.user_ids[pos] == user_ids if len(self.user_ids) else np.zeros(len(user_ids), bool)
        )
        take = pa.array(np.where(found, pos, 0), mask=~found)  # null index -> null value
        cols = {
            n: c.take(take) if len(c) else pa.nulls(len(user_ids), pa.int64())
            for n, c in self.columns.items()
        }
        ts = np.where(found, self.ts_ms[pos] if len(self.ts_ms) else 0, 0)
        return cols, ts


class OfflineSource:
    """The behaviour and profile parquet files of one offline store folder."""

    def __init__(self, directory: str | Path, spec: InputSpec) -> None:
        self.dir = Path(directory)
        self.spec = spec
        self.behavior_path = self.dir / BEHAVIOR_FILE
        self.profile_path = self.dir / PROFILE_FILE
        if not self.behavior_path.exists():
            raise DataNotFoundError(
                f"{self.behavior_path} not found: build the offline store first (data pipeline)"
            )
        self.file = pq.ParquetFile(self.behavior_path)
        self.seq_names = [f.name for f in spec.sequence_features]
        # the behaviour columns the encoder reads: sequences, then long-term features
        self.behavior_names = [*self.seq_names, *spec.long_term_names]
        for c in (USER_ID, EVENT_TIMESTAMP, *self.behavior_names):
            if c not in self.file.schema_arrow.names:
                hint = (
                    " (the model reads long-term features: rebuild the data set)"
                    if c in spec.long_term_names
                    else ""
                )
                raise SchemaError(str(self.behavior_path), c, "is missing" + hint)
        self._profile: ProfileTable | None = None
        self._cursor: tuple[int, int, Iterator[pa.RecordBatch]] | None = None
        self._cursor_rows = 0

    @property
    def profile(self) -> ProfileTable:
        if self._profile is None:
            names = [f.name for f in self.spec.profile_features]
            self._profile = ProfileTable(self.profile_path, names)
        return self._profile

    def fingerprint(self) -> str:
        """Changes when either file is rewritten (sizes, row counts, row group layout)."""
        md = self.file.metadata
        parts = [str(self.behavior_path.stat().st_size), str(md.num_rows)]
        parts += [str(md.row_group(g).num_rows) for g in range(md.num_row_groups)]
        if self.profile_path.exists():
            pmd = pq.ParquetFile(self.profile_path).metadata
            parts += [str(self.profile_path.stat().st_size), str(pmd.num_rows)]
        return hashlib.sha256(",".join(parts).encode()).hexdigest()[:16]

    def plan(
        self, part_rows: int, since_ms: int | None = None, forgotten: Collection[str] = ()
    ) -> SourcePlan:
        """Pick each user's latest row and split the file into parts (reads two columns);
        `forgotten` users get no row."""
        t = self.file.read(columns=[USER_ID, EVENT_TIMESTAMP])
        uid = np.asarray(t.column(USER_ID).to_numpy(), dtype=np.int64)
        ts = timestamps_ms(t.column(EVENT_TIMESTAMP))
        del t
        selected = latest_rows(uid, ts)
        held: tuple[str, ...] = ()
        if forgotten:
            gone = np.asarray(sorted(int(u) for u in forgotten), dtype=np.int64)
            skip = np.isin(uid[selected], gone)
            in_profile = gone[np.isin(gone, self.profile.user_ids)]
            held = tuple(format_user_ids(np.union1d(uid[selected][skip], in_profile)))
            selected = selected[~skip]
        _, profile_ts = self.profile.lookup(uid[selected])
        feature_ts = np.maximum(ts[selected], profile_ts)  # (U,)
        changed_sel = (
            feature_ts > since_ms if since_ms is not None else np.ones(len(selected), bool)
        )
        parts: list[Part] = []
        md = self.file.metadata
        start = 0
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            for j, a in enumerate(range(start, start + n, part_rows)):
                b = min(a + part_rows, start + n)
                lo, hi = np.searchsorted(selected, [a, b])
                if hi > lo:
                    parts.append(
                        Part(
                            id=f"{g}.{j}",
                            row_group=g,
                            index=j,
                            rows=selected[lo:hi] - a,
                            changed=changed_sel[lo:hi],
                        )
                    )
            start += n
        return SourcePlan(
            fingerprint=self.fingerprint(),
            part_rows=part_rows,
            parts=tuple(parts),
            users=int(len(selected)),
            changed=int(changed_sel.sum()),
            watermark_ms=int(feature_ts.max()) if len(feature_ts) else 0,
            since_ms=since_ms,
            held_forgotten=held,
        )

    def _batch(self, part: Part, part_rows: int) -> pa.RecordBatch:
        """The part's slice of its row group. Parquet cannot seek inside a row group, so the
        open batch iterator is kept: parts read in file order decode every slice once."""
        g, j, it = self._cursor if self._cursor else (-1, 0, None)
        if it is None or g != part.row_group or j > part.index or part_rows != self._cursor_rows:
            g, j = part.row_group, 0
            it = self.file.iter_batches(
                batch_size=part_rows,
                row_groups=[g],
                columns=[USER_ID, EVENT_TIMESTAMP, *self.behavior_names],
                use_threads=False,
            )
        self._cursor_rows = part_rows
        for batch in it:
            j += 1
            if j - 1 == part.index:
                self._cursor = (g, j, it)
                return batch
        self._cursor = None
        raise DataNotFoundError(
            f"{self.behavior_path}: part {part.id} is past the end: the file changed"
        )

    def read_part(self, part: Part, part_rows: int) -> pa.Table:
        """The part's users: user_id, feature_ts_ms, the sequence, long-term and profile
        feature columns."""
        batch = self._batch(part, part_rows)
        rows = batch.take(pa.array(part.rows))
        uid = np.asarray(rows.column(USER_ID).to_numpy(), dtype=np.int64)
        profile, profile_ts = self.profile.lookup(uid)
        ts = np.maximum(timestamps_ms(rows.column(EVENT_TIMESTAMP)), profile_ts)
        cols: dict[str, pa.Array] = {USER_ID: pa.array(uid), FEATURE_TS: pa.array(ts)}
        cols.update({n: rows.column(n) for n in self.behavior_names})
        cols.update(profile)
        return pa.table(cols)

    def sample_user_ids(self, plan: SourcePlan, n: int, seed: int = 0) -> list[str]:
        """Up to n user ids drawn evenly over the parts (reads the user_id column only)."""
        if plan.users == 0 or n <= 0:
            return []
        uid = np.asarray(self.file.read(columns=[USER_ID]).column(USER_ID).to_numpy())
        md = self.file.metadata
        starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])
        rows = np.concatenate(
            [starts[p.row_group] + p.index * plan.part_rows + p.rows for p in plan.parts]
        )
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(rows), size=min(n, len(rows)), replace=False)
        return format_user_ids(uid[rows[np.sort(pick)]])
