"""The pipeline's state on one screen: what `userembed status` prints (and `--json`).

One `Check` per stage, in pipeline order: Redis, data set, Feast registry, online rows, training
runs, model registry, embedding versions, server. Each says what is there and, when something
is missing, stale or failed, the command to run next; `Status.next` is the first of those.

    status = gather(runs, server)      # runs, server: what the trainer and the server report
    print("\\n".join(status.lines()))

This package reads what it owns (data files, the Feast registry file, the model registry,
Redis). It imports neither the trainer nor gRPC, so the caller (userembed.commands.status)
lists the run folders and asks the server's health and passes both in as plain records.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow.parquet as pq
import redis
import yaml
from google.protobuf.timestamp_pb2 import Timestamp
from redis.cluster import RedisCluster

from userembed import paths
from userembed import prerequisites as pre
from userembed.datasets.spec import SPEC_FILE, DatasetSpec, to_utc
from userembed.errors import UserEmbedError
from userembed.feast_ops import feast_registry_path
from userembed.features import BEHAVIOR_VIEW
from userembed.redis_urls import RedisClient, open_redis, redacted
from userembed.registry import DEFAULT_MODEL, LATEST, Registry
from userembed.vectors import STATUS_FAILED, STATUS_READY, VectorStore

OK = "ok"
MISSING = "missing"
STALE = "stale"
FAILED = "failed"
UNKNOWN = "unknown"  # not looked at: what it is read from is missing or down

ONLINE_SAMPLE = 64  # online rows whose snapshot time is compared with the data set's
ONLINE_COUNT_CAP = 1_000_000  # stop counting online rows here (SCAN of a large keyspace)
RUNS_SHOWN = 3


@dataclass(frozen=True)
class Check:
    stage: str
    state: str
    summary: str
    next: str = ""  # the command to run next; "" when nothing is to do
    more: tuple[str, ...] = ()  # further lines (one per run, per version, ...)
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunInfo:
    """One training run folder, as the trainer's layout reads it."""

    run_id: str
    path: str
    finished: bool  # its final model exists
    test_auc: Mapping[str, float]
    modified_at: float  # epoch seconds of its newest file


@dataclass(frozen=True)
class ServerProbe:
    """The gRPC health answer at `target`: SERVING, NOT_SERVING, or None when nothing answers."""

    target: str
    health: str | None
    error: str = ""


@dataclass(frozen=True)
class Status:
    home: str
    redis_url: str
    checks: tuple[Check, ...]

    @property
    def next(self) -> str:
        return next((c.next for c in self.checks if c.next), "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "home": self.home,
            "redis_url": self.redis_url,
            "next": self.next,
            "checks": [asdict(c) | {"more": list(c.more)} for c in self.checks],
        }

    def lines(self) -> list[str]:
        pad = " " * 22
        out = [f"home {self.home}, Redis {self.redis_url}"]
        for c in self.checks:
            out.append(f"{c.state:<8} {c.stage:<12} {c.summary}")
            out += [pad + line for line in c.more]
            if c.next and c.state != OK:
                out.append(f"{pad}-> {c.next}")
        out.append(f"next: {self.next}" if self.next else "next: nothing, every stage is ready")
        return out


def _when(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def redis_check(client: RedisClient, url: str) -> Check:
    r: Any = client  # redis-py types each command as "result | Awaitable[result]"
    # a cluster client asks one random node unless told to sum over the masters
    every_master = {"target_nodes": RedisCluster.PRIMARIES} if isinstance(r, RedisCluster) else {}
    try:
        keys = int(r.dbsize(**every_master))
    except redis.RedisError as e:
        summary = f"no answer at {url} ({e}); set REDIS_URL to use another"
        return Check("redis", MISSING, summary, next="redis-server --daemonize yes")
    return Check("redis", OK, f"answers, {keys} keys in this db", details={"keys": keys})


def data_set_check() -> tuple[Check, DatasetSpec | None]:
    problem = pre.data_set_problem() or pre.offline_tables_problem()
    if problem:
        return Check("data set", MISSING, problem, next=pre.DATA_BUILD), None
    folder = paths.data_dir()
    spec = DatasetSpec.load(folder)
    built = (folder / SPEC_FILE).stat().st_mtime
    users = pq.ParquetFile(folder / paths.USERS_FILE).metadata.num_rows
    events = pq.ParquetFile(folder / paths.EVENTS_FILE).metadata.num_rows
    tasks = ", ".join(spec.tasks) or "no tasks"
    summary = f"{spec.name}: {users} users, {events} events, {tasks}; built {_when(built)}"
    details = {"name": spec.name, "users": users, "events": events, "built_at": _when(built)}
    return Check("data set", OK, summary, details=details | {"tasks": list(spec.tasks)}), spec


def feast_check(upstream_ok: bool) -> Check:
    problem = pre.feast_registry_problem()
    if problem:
        return Check("feast", MISSING, problem, next=pre.FEAST_APPLY if upstream_ok else "")
    path = feast_registry_path()
    written = _when(path.stat().st_mtime)
    return Check("feast", OK, f"registry applied, last written {written} ({path})")


def _feast_project() -> str:
    """The project name, spelled once in feature_store.yaml; it ends every online row's key."""
    config = yaml.safe_load((paths.FEATURE_REPO / "feature_store.yaml").read_text())
    return str(config["project"])


def online_rows_check(client: RedisClient, spec: DatasetSpec | None, upstream_ok: bool) -> Check:
    """Feast's online rows in Redis against the offline tables.

    No data-set fingerprint is stored online, so the check compares times: a materialised row
    holds its user's newest snapshot, which for the current data set is at `spec.data_end`.
    Rows dated later come from pushed behaviour or an earlier data set (which Feast keeps over
    the new rows); rows dated earlier were materialised before the last build. A rebuild with
    the same times but other values is not seen here.
    """
    if not upstream_ok:
        return Check("online rows", UNKNOWN, "needs the Feast registry and Redis first")
    # Feast's Redis layout: one hash per entity, key = serialised entity key + project name,
    # field `_ts:<view>` = the row's event time as a protobuf Timestamp.
    rows = 0
    sample: list[bytes] = []
    for key in client.scan_iter(match=b"*" + _feast_project().encode(), count=10_000):
        rows += 1
        if len(sample) < ONLINE_SAMPLE:
            sample.append(key)
        if rows >= ONLINE_COUNT_CAP:
            break
    if rows == 0:
        return Check("online rows", MISSING, "no Feast rows in Redis", next=pre.FEAST_MATERIALIZE)
    counted = f"{rows}+" if rows >= ONLINE_COUNT_CAP else str(rows)
    pipe: Any = client.pipeline(transaction=False)  # redis-py types keys as str only
    for key in sample:
        pipe.hget(key, f"_ts:{BEHAVIOR_VIEW}")
    times = []
    for raw in pipe.execute():
        if raw:
            ts = Timestamp()
            ts.ParseFromString(raw)
            times.append(ts.ToDatetime(tzinfo=UTC))
    details: dict[str, Any] = {"rows": counted, "sampled": len(sample)}
    if spec is None or not times:
        return Check("online rows", OK, f"{counted} rows in Redis", details=details)
    final = to_utc(spec.data_end).to_pydatetime()
    built = _when((paths.data_dir() / SPEC_FILE).stat().st_mtime)
    newer = sum(t > final for t in times)
    older = sum(t < final for t in times)
    details |= {"data_end": final.isoformat(), "newer": newer, "older": older, "built_at": built}
    head = f"{counted} rows in Redis; of {len(times)} sampled,"
    if newer:
        summary = (
            f"{head} {newer} are dated after the data set's last snapshot {final:%Y-%m-%d %H:%M} "
            "(pushed behaviour, or an earlier data set's rows that shadow this one)"
        )
        fix = f"{pre.FEAST_FRESH} && {pre.FEAST_MATERIALIZE}"
        return Check("online rows", STALE, summary, next=fix, details=details)
    if older:
        summary = (
            f"{head} {older} are older than the data set's last snapshot "
            f"{final:%Y-%m-%d %H:%M} (materialised before the build of {built})"
        )
        return Check("online rows", STALE, summary, next=pre.FEAST_MATERIALIZE, details=details)
    summary = f"{head} all hold the data set's last snapshot {final:%Y-%m-%d %H:%M}"
    more = (f"offline tables built {built}; compared by snapshot time (no fingerprint online)",)
    return Check("online rows", OK, summary, more=more, details=details)


def runs_check(runs: Sequence[RunInfo], upstream_ok: bool) -> Check:
    finished = [r for r in runs if r.finished]
    more = tuple(
        f"{r.run_id}: " + (" ".join(f"{t}={v:.4f}" for t, v in r.test_auc.items()) or "no test AUC")
        for r in finished[-RUNS_SHOWN:]
    )
    unfinished = [r for r in runs if not r.finished]
    if unfinished and (not finished or unfinished[-1].modified_at > finished[-1].modified_at):
        last = unfinished[-1]
        more += (f"{last.run_id}: no final model (still training, or stopped: resume it)",)
    details = {"runs": [asdict(r) for r in runs]}
    if not finished:
        follow = pre.TRAIN if upstream_ok else ""
        if unfinished:
            follow = f"{pre.TRAIN} --resume --run-id {unfinished[-1].run_id}"
        summary = "no trained run in " + str(paths.runs_dir())
        return Check("runs", MISSING, summary, next=follow, more=more, details=details)
    summary = f"{len(finished)} trained in {paths.runs_dir()}; test AUC of the newest:"
    return Check("runs", OK, summary, more=more, details=details)


def registry_check(newest_run: RunInfo | None, model: str = DEFAULT_MODEL) -> Check:
    registry = Registry()
    models = registry.list_models()
    if model not in models:
        follow = pre.EXPORT.format(run=newest_run.path) if newest_run else ""
        return Check("registry", MISSING, f"no model '{model}' in {registry.root}", next=follow)
    versions = registry.list_versions(model)
    aliases = registry.aliases(model)
    named = ", ".join(f"{a}={v}" for a, v in sorted(aliases.items()))
    count = f"{len(versions)} version{'s' if len(versions) != 1 else ''}"
    summary = f"{model}: {count}; {named} ({registry.root})"
    others = [m for m in models if m != model]
    more = (f"other models: {', '.join(others)}",) if others else ()
    details = {"model": model, "versions": versions, "aliases": aliases, "models": models}
    return Check("registry", OK, summary, more=more, details=details)


def embeddings_check(client: RedisClient, upstream_ok: bool, model: str = DEFAULT_MODEL) -> Check:
    """The embedding version readers follow, and the newest refresh if it did not publish."""
    if not upstream_ok:
        return Check("embeddings", UNKNOWN, "needs a registered model and Redis first")
    store = VectorStore(client, model)
    current_id = store.current_version()
    versions = store.list_versions()
    current = next((v for v in versions if v.id == current_id), None)
    newest = versions[-1] if versions else None
    details: dict[str, Any] = {"current": current_id, "versions": [asdict(v) for v in versions]}
    kept = f"{len(versions)} version{'s' if len(versions) != 1 else ''} kept"
    failed = newest is not None and newest.id != current_id and newest.status == STATUS_FAILED
    more: tuple[str, ...] = ()
    if newest is not None and newest.id != current_id and newest.status != STATUS_READY:
        if failed:
            more = (f"{newest.id}: {newest.note or 'no reason recorded'}",)
        else:  # building: a run in progress, or one killed that the next run resumes
            more = (
                f"{newest.id} is {newest.status} (in progress, or stopped: refresh resumes it)",
            )
    if current is None:
        summary = f"no embedding version serves {model} ({kept})"
        return Check("embeddings", MISSING, summary, pre.REFRESH, more, details)
    serving = (
        f"{current.id} ({current.status}: validated, {current.users} users, "
        f"model version {current.model_version})"
    )
    if failed:
        summary = f"the newest refresh failed validation; readers stay on {serving}"
        return Check("embeddings", FAILED, summary, pre.REFRESH, more, details)
    summary = f"readers follow {serving}; {kept}"
    latest = Registry().resolve(model, LATEST)
    if current.model_version != latest:
        more += (f"the registry's {LATEST} is {latest}: its vectors are not computed yet",)
        return Check("embeddings", STALE, summary, pre.REFRESH, more, details)
    return Check("embeddings", OK, summary, more=more, details=details)


def server_check(probe: ServerProbe, model_ok: bool) -> Check:
    details = {"target": probe.target, "health": probe.health}
    if probe.health == "SERVING":
        return Check("server", OK, f"SERVING at {probe.target}", details=details)
    if probe.health is not None:
        summary = f"{probe.health} at {probe.target} (no model loaded yet)"
        follow = "" if model_ok else pre.EXPORT.format(run="RUN_DIR")
        return Check("server", MISSING, summary, next=follow, details=details)
    summary = f"nothing answers at {probe.target}"
    follow = pre.SERVE if model_ok else ""
    return Check("server", MISSING, summary, next=follow, details=details)


def _guarded(stage: str, check: Callable[[], Check]) -> Check:
    """One stage's check; a stage whose state cannot be read (a corrupt file, Redis gone
    midway) is shown as failed so the other stages still show."""
    try:
        return check()
    except (UserEmbedError, redis.RedisError, OSError, ValueError) as e:
        return Check(stage, FAILED, f"cannot read its state: {type(e).__name__}: {e}")


def gather(runs: Sequence[RunInfo], server: ServerProbe, model: str = DEFAULT_MODEL) -> Status:
    url = paths.redis_url()
    shown = redacted(url)  # the password never reaches a status line
    client = open_redis(url, socket_connect_timeout=2, socket_timeout=5)
    try:
        redis_state = redis_check(client, shown)
        redis_ok = redis_state.state == OK
        spec: list[DatasetSpec] = []

        def data_set() -> Check:
            check, found = data_set_check()
            spec.extend([found] if found else [])
            return check

        data = _guarded("data set", data_set)
        data_ok = data.state == OK
        feast = _guarded("feast", lambda: feast_check(data_ok))
        feast_ok = redis_ok and feast.state == OK
        online = _guarded(
            "online rows", lambda: online_rows_check(client, spec[0] if spec else None, feast_ok)
        )
        finished = [r for r in runs if r.finished]
        registry = _guarded(
            "registry", lambda: registry_check(finished[-1] if finished else None, model)
        )
        model_ok = registry.state == OK
        embeddings = _guarded(
            "embeddings", lambda: embeddings_check(client, redis_ok and model_ok, model)
        )
        checks = (
            redis_state,
            data,
            feast,
            online,
            runs_check(runs, data_ok),
            registry,
            embeddings,
            server_check(server, model_ok),
        )
    finally:
        client.close()
    return Status(str(paths.home()), shown, checks)
