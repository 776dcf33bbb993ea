"""Batch refresh throughput: `userembed refresh` (local engine) on synthetic users vs raw ORT.

    .venv/bin/python bench/refresh.py                    # 1,000,000 users
    .venv/bin/python bench/refresh.py --users 100000     # quicker

Writes the offline parquet files directly with pyarrow (vectorised; 10% of users also get an
older snapshot row, so the latest-row selection has work to do), publishes the serving bench's
encoder (bench/serving_data.py, `--encoder`: the trainer's default SUPERMOE with random
weights, or the cheap synthetic FFN; 4 sequence features, L=50) to a scratch registry, starts
a private redis-server, then:
- raw onnxruntime users/s on pre-encoded inputs of the same batch size (before and after),
- the refresh as a subprocess (`userembed refresh --json`): total seconds, users/s, peak RSS
  of that process (getrusage of the waited child).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.* as a script

from bench.common import log, private_redis, raw_onnxruntime
from bench.serving_data import DIM, ENCODERS, MODEL, SEQ_LEN, input_spec, publish_encoder
from refresh.config import RefreshConfig
from userembed.features import encode_arrow
from userembed.snapshots import BEHAVIOR_FILE, PROFILE_FILE

T0_MS = 1_764_000_000_000


def list_column(rng: np.random.Generator, lens: np.ndarray, hi: int) -> pa.ListArray:
    offsets = np.zeros(len(lens) + 1, dtype=np.int32)
    np.cumsum(lens, out=offsets[1:])
    values = rng.integers(0, hi, size=int(offsets[-1]), dtype=np.int64)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def write_offline(directory: Path, users: int, seq_len: int, row_group: int) -> None:
    """behavior.parquet (1.1 rows per user, shuffled) and profile.parquet, like Feast's."""
    rng = np.random.default_rng(0)
    extra = rng.choice(users, size=users // 10, replace=False)
    uid = np.concatenate([np.arange(users), extra])
    ts = np.concatenate([np.full(users, T0_MS), np.full(len(extra), T0_MS - 86_400_000)])
    ts = ts + rng.integers(0, 3_600_000, size=len(uid))
    order = rng.permutation(len(uid))
    uid, ts = uid[order], ts[order]
    lens = rng.integers(5, seq_len + 1, size=len(uid))
    cols: dict[str, Any] = {
        "user_id": pa.array(uid),
        "event_timestamp": pa.array(ts).cast(pa.timestamp("ms", tz="UTC")),
    }
    for name, hi in (
        ("item_seq", 50_000),
        ("category_seq", 300),
        ("event_type_seq", 4),
        ("gap_bucket_seq", 16),
    ):
        cols[name] = list_column(rng, lens, hi)
    cols["seq_len"] = pa.array(lens.astype(np.int64))
    directory.mkdir(parents=True)
    pq.write_table(pa.table(cols), directory / BEHAVIOR_FILE, row_group_size=row_group)
    prof: dict[str, Any] = {
        "user_id": pa.array(np.arange(users)),
        "event_timestamp": pa.array(np.full(users, T0_MS - 7 * 86_400_000)).cast(
            pa.timestamp("ms", tz="UTC")
        ),
    }
    for name, hi in (("age_bucket", 7), ("gender", 3), ("occupation", 21), ("region", 50)):
        prof[name] = pa.array(rng.integers(0, hi, size=users))
    pq.write_table(pa.table(prof), directory / PROFILE_FILE)


def first_rows(offline: Path, spec: Any, batch: int) -> dict[str, np.ndarray]:
    """Encoder inputs of the first `batch` behaviour rows and their profiles."""
    t = pq.ParquetFile(offline / BEHAVIOR_FILE).read_row_group(0).slice(0, batch)
    p = pq.read_table(offline / PROFILE_FILE).take(pa.array(t["user_id"].to_numpy()))
    cols = {n: t[n] for n in t.column_names} | {n: p[n] for n in p.column_names if n != "user_id"}
    return encode_arrow(cols, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=RefreshConfig.batch_size)
    ap.add_argument("--part-rows", type=int, default=65_536)
    ap.add_argument("--ort-seconds", type=float, default=5.0)
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--encoder", default="supermoe", choices=ENCODERS)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-refresh-"))
    try:
        spec = input_spec()
        t = time.perf_counter()
        offline = work / "offline"
        write_offline(offline, args.users, SEQ_LEN, args.part_rows)
        log(f"wrote offline parquet for {args.users} users in {time.perf_counter() - t:.1f}s")
        version, onnx_path = publish_encoder(work, spec, args.encoder)
        inputs = first_rows(offline, spec, args.batch_size)
        with private_redis(work) as url:
            print(json.dumps(measure(args, work, url, onnx_path, version, inputs)))
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def measure(
    args: argparse.Namespace, work: Path, url: str, onnx_path: Path, version: str, inputs: Any
) -> dict[str, Any]:
    """Raw onnxruntime, the refresh as a subprocess, raw onnxruntime again."""
    ort_before = raw_onnxruntime(onnx_path, DIM, inputs, args.ort_seconds)
    log(f"raw onnxruntime: {ort_before:.0f} users/s at batch {args.batch_size}")
    cmd = [
        str(Path(sys.executable).with_name("userembed")), "refresh", "--model", MODEL,
        "--json", "--batch-size", str(args.batch_size), "--part-rows", str(args.part_rows),
        "--offline-dir", str(work / "offline"), "--registry-root", str(work / "models"),
        "--redis-url", url,
    ]  # fmt: skip
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, env=os.environ.copy())
    wall = time.perf_counter() - t
    # ru_maxrss of waited children, KiB on Linux: only the refresh has been waited for yet.
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    summary = json.loads(out.stdout.decode().strip().splitlines()[-1])

    ort_after = raw_onnxruntime(onnx_path, DIM, inputs, args.ort_seconds)
    log(f"raw onnxruntime after: {ort_after:.0f} users/s")
    ort = (ort_before + ort_after) / 2
    rate = summary["users"] / summary["seconds"]
    print(
        f"refresh: {summary['users']} users in {summary['seconds']:.1f}s = {rate:.0f} users/s; "
        f"raw ORT {ort:.0f} users/s; ratio {round(rate / ort, 3)}; peak RSS {peak_mib:.0f} MiB"
    )
    return {
        "bench": "refresh",
        "users": summary["users"],
        "encoder": args.encoder,
        "model_version": version,
        "embedding_version": summary["embedding_version"],
        "batch_size": args.batch_size,
        "part_rows": args.part_rows,
        "refresh_seconds": summary["seconds"],
        "process_wall_seconds": round(wall, 2),
        "refresh_users_per_s": round(rate),
        "raw_ort_users_per_s": round(ort),
        "raw_ort_before_after": [round(ort_before), round(ort_after)],
        "ratio_to_raw_ort": round(rate / ort, 3),
        "peak_rss_mib": round(peak_mib),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


if __name__ == "__main__":
    main()
