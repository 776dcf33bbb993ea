"""Training frames and materialisation at scale: the DuckDB offline store beside the others.

    nice .venv/bin/python bench/offline_store.py --quick   # 10k and 100k label rows, 100k users
    nice .venv/bin/python bench/offline_store.py           # 10k, 100k and 1M label rows, 1M users

Per size (label rows), `userembed data build` writes one synthetic data set (4 label rows per
user, with the future targets) under a scratch $USEREMBED_HOME; then each path builds the
trainer's frame from the same files, each in a process of its own (its peak RSS is that path's
alone; seconds time the frame, not the ~10 s store start):
  duckdb      feast_ops.training_frame through the DuckDB offline store (feature_store.yaml)
  dask        the same through Feast's file (dask) offline store, the earlier configuration
  merge_asof  bench/pit_join.py: pandas merge_asof over the same files, the earlier fallback
Every frame's digest must equal merge_asof's. Then `materialize` of every user of a data set of
--materialize-users users into a private redis-server (emptied before each run): through
DuckDB (newest row per user picked by the store, batched writes, progress lines) and through
the file store with Feast's default materialisation (every row pulled, one write batch).
A path above its size cap (--dask-max-rows, --dask-max-users) is skipped, one over --timeout-s
is stopped; both are reported as such. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.* as a script

from bench.common import log, private_redis  # noqa: E402

PATHS = ("duckdb", "dask", "merge_asof")
LABELS_PER_USER = 4  # synthetic: one label row per user per cut
QUICK_SIZES = (10_000, 100_000)
FULL_SIZES = (10_000, 100_000, 1_000_000)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def rss_now_gib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


# --- the scratch workspace ---------------------------------------------------------------------


def build(home: Path, users: int, seed: int) -> dict[str, Any]:
    """`userembed data build --source synthetic` into `home` (its own process: its memory is
    not the measured paths')."""
    code = (
        "from userembed.dataset_build import BuildRequest, build_dataset; import json; "
        f"print(json.dumps(build_dataset(BuildRequest('synthetic', {users}, {seed}))))"
    )
    env = {**os.environ, "USEREMBED_HOME": str(home)}
    env.pop("USEREMBED_OFFLINE_DIR", None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def file_store_repo(work: Path) -> Path:
    """feature_repo/ with the file (dask) offline store and Feast's default materialisation."""
    from userembed.feast_ops import DEFAULT_FEAST_CONFIG
    from userembed.paths import FEATURE_REPO

    repo = work / "repo-file"
    repo.mkdir(parents=True, exist_ok=True)
    for name in ("definitions.py", ".feastignore"):
        shutil.copy(FEATURE_REPO / name, repo / name)
    config = yaml.safe_load((FEATURE_REPO / DEFAULT_FEAST_CONFIG).read_text())
    config["offline_store"] = {"type": "file"}
    config.pop("materialization", None)
    (repo / DEFAULT_FEAST_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    return repo


def repo_of(path: str, work: Path) -> Path:
    from userembed.paths import FEATURE_REPO

    return file_store_repo(work) if path == "dask" else FEATURE_REPO


# --- child processes ---------------------------------------------------------------------------


def frame_digest(frame: pd.DataFrame) -> str:
    """md5 over every column (lists flattened with their lengths), normalised so that equal
    frames of different dtypes (int / float with NaN, timestamp units) agree."""
    h = hashlib.md5()
    for col in frame.columns:
        values = frame[col]
        h.update(col.encode())
        if values.dtype == object and len(values) and not isinstance(values.iloc[0], str):
            cells = [np.asarray([] if v is None else v, dtype=np.int64) for v in values]
            h.update(np.array([len(c) for c in cells], dtype=np.int64).tobytes())
            h.update(np.concatenate(cells).tobytes() if cells else b"")
        elif pd.api.types.is_datetime64_any_dtype(values):
            h.update(
                values.dt.tz_convert("UTC")
                .astype("datetime64[ns, UTC]")
                .astype("int64")
                .to_numpy()
                .tobytes()
            )
        elif values.dtype == object:
            h.update("\x00".join(map(str, values)).encode())
        else:
            h.update(values.to_numpy(dtype=np.float64, na_value=np.nan).tobytes())
    return h.hexdigest()


def role_frame(args: argparse.Namespace) -> dict[str, Any]:
    from userembed import feast_ops, paths
    from userembed.dataset_build import load_built

    labels, spec = load_built()
    if args.path == "merge_asof":
        from bench.pit_join import merge_asof_frame

        before = rss_now_gib()
        t0 = time.perf_counter()
        frame = merge_asof_frame(paths.offline_dir(), labels, spec)
    else:
        store = feast_ops.open_store(args.redis_url, Path(args.repo))
        before = rss_now_gib()
        t0 = time.perf_counter()
        frame = feast_ops.training_frame(store, labels, spec)
    seconds = time.perf_counter() - t0
    peak = peak_rss_gib()
    return {
        "seconds": round(seconds, 2),
        "peak_rss_gib": round(peak, 2),
        "rss_before_gib": round(before, 2),
        "rows": len(frame),
        "rows_per_s": round(len(frame) / seconds),
        "digest": frame_digest(frame),
    }


def role_materialize(args: argparse.Namespace) -> dict[str, Any]:
    import redis

    from userembed import feast_ops

    store = feast_ops.open_store(args.redis_url, Path(args.repo))
    before = rss_now_gib()
    t0 = time.perf_counter()
    feast_ops.materialize(store)
    seconds = time.perf_counter() - t0
    client = redis.Redis.from_url(args.redis_url)
    return {
        "seconds": round(seconds, 2),
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "rss_before_gib": round(before, 2),
        # Feast's rows, one hash per user (not the `ue:` keys: materialize's own record)
        "online_rows": sum(1 for k in client.scan_iter(count=1000) if not k.startswith(b"ue:")),
        "redis_used_mib": round(cast(dict[str, Any], client.info("memory"))["used_memory"] / 2**20),
    }


def run_child(role: str, home: Path, timeout_s: int, **opts: str) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--role", role]
    for k, v in opts.items():
        argv += [f"--{k.replace('_', '-')}", v]
    env = {**os.environ, "USEREMBED_HOME": str(home)}
    env.pop("USEREMBED_OFFLINE_DIR", None)
    env.pop("USEREMBED_FEAST_REGISTRY", None)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            argv, env=env, stdout=subprocess.PIPE, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return {"timed_out_after_s": timeout_s}
    if proc.returncode != 0:
        return {"failed": proc.returncode}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_seconds"] = round(time.perf_counter() - t0, 1)
    return out


# --- the benchmark -----------------------------------------------------------------------------


def apply_registry(home: Path, redis_url: str) -> None:
    code = (
        "from userembed import feast_ops; import sys; "
        "feast_ops.apply(feast_ops.open_store(sys.argv[1]))"
    )
    env = {**os.environ, "USEREMBED_HOME": str(home)}
    env.pop("USEREMBED_OFFLINE_DIR", None)
    env.pop("USEREMBED_FEAST_REGISTRY", None)
    subprocess.run([sys.executable, "-c", code, redis_url], env=env, check=True)


def frames(args: argparse.Namespace, work: Path, url: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rows in args.sizes:
        home = work / f"frames-{rows}"
        t0 = time.perf_counter()
        built = build(home, rows // LABELS_PER_USER, args.seed)
        apply_registry(home, url)
        log(f"{rows:,} label rows: data build {built['seconds']}s ({built['events']:,} events)")
        size: dict[str, Any] = {"label_rows": built["label_rows"], "events": built["events"]}
        for path in args.paths:
            if path == "dask" and rows > args.dask_max_rows:
                size[path] = {"skipped": f"above --dask-max-rows {args.dask_max_rows}"}
                log(f"  {path}: skipped (above --dask-max-rows)")
                continue
            repo = repo_of(path, work)
            res = run_child("frame", home, args.timeout_s, path=path, repo=str(repo), redis_url=url)
            size[path] = res
            log(f"  {path}: {res}")
        digests = [size[p]["digest"] for p in args.paths if "digest" in size.get(p, {})]
        # None: fewer than two paths finished, nothing to compare
        size["frames_equal"] = len(set(digests)) == 1 if len(digests) > 1 else None
        out[str(rows)] = size
        shutil.rmtree(home, ignore_errors=True)
        log(f"  ({time.perf_counter() - t0:.0f}s for this size)")
    return out


def materializations(args: argparse.Namespace, work: Path, url: str) -> dict[str, Any]:
    import redis

    users = args.materialize_users
    home = work / f"materialize-{users}"
    built = build(home, users, args.seed)
    apply_registry(home, url)
    log(f"materialize: {users:,} users ({built['events']:,} events) built in {built['seconds']}s")
    out: dict[str, Any] = {"users": users}
    for path in ("duckdb", "dask"):
        if path == "dask" and users > args.dask_max_users:
            out[path] = {"skipped": f"above --dask-max-users {args.dask_max_users}"}
            log(f"  {path}: skipped (above --dask-max-users)")
            continue
        redis.Redis.from_url(url).flushdb()
        repo = repo_of(path, work)
        out[path] = run_child("materialize", home, args.timeout_s, repo=str(repo), redis_url=url)
        log(f"  {path}: {out[path]}")
    shutil.rmtree(home, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10k and 100k label rows, 100k users")
    ap.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=None,
        help='label rows, comma-separated ("": none)',
    )
    ap.add_argument("--paths", type=lambda s: s.split(","), default=list(PATHS))
    ap.add_argument("--materialize-users", type=int, default=None)
    ap.add_argument("--no-materialize", action="store_true")
    ap.add_argument("--dask-max-rows", type=int, default=100_000)
    ap.add_argument("--dask-max-users", type=int, default=100_000)
    ap.add_argument("--timeout-s", type=int, default=900, help="per path and size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--role", choices=("frame", "materialize"), default=None)
    ap.add_argument("--path", choices=PATHS, default=None)
    ap.add_argument("--repo", default=None)
    ap.add_argument("--redis-url", default=None)
    args = ap.parse_args()

    if args.role:
        import logging
        import warnings

        warnings.filterwarnings("ignore", category=DeprecationWarning)
        logging.basicConfig(level=logging.INFO, format="    %(name)s: %(message)s")
        for noisy in ("feast", "ray", "py.warnings"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        answer = role_frame(args) if args.role == "frame" else role_materialize(args)
        print(json.dumps(answer))
        return

    unknown = set(args.paths) - set(PATHS)
    if unknown:
        ap.error(f"unknown paths {sorted(unknown)}; known: {', '.join(PATHS)}")
    if args.sizes is None:
        args.sizes = list(QUICK_SIZES if args.quick else FULL_SIZES)
    if args.materialize_users is None:
        args.materialize_users = 100_000 if args.quick else 1_000_000
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-offline-store-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),  # a shared machine
    }
    with private_redis(work) as url:
        result["frames"] = frames(args, work, url)
        if not args.no_materialize:
            result["materialize"] = materializations(args, work, url)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
