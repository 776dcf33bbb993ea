"""Serving cost of item attributes: the refresh and the miss path of a model trained with the
items table beside the same model trained without it, measured side by side in one run.

    .venv/bin/python bench/item_cost.py                  # about 4 minutes on 2 cores
    .venv/bin/python bench/item_cost.py --quick          # tiny (tests/bench/test_item_cost.py)

MovieLens-100K with its items table (`userembed data build --source movielens --items`: every
genre of a movie, its release-year bucket) in a scratch workspace and a private Redis. One
training frame (Feast's point-in-time join), two models trained on it with the same options
and seed: one with the data set's item attribute map, as `userembed train` trains when the
build has an items table (attribute tables beside the item id, the long-term attribute
histogram), one without, as a build without the table. Both are exported to one registry (the
map ships in the entry), then the MovieLens users are tiled `--copies` times into the offline
files (each user's latest feature row; ids 0..N-1) and materialised, so that the throughput
runs see thousands of users. Then in `--rounds` rounds, with and without in turn (which goes
first alternates), and the median round of each side:
- refresh: `refresh.job.refresh` (full, local engine) over every user; the similar-users index,
  the compatibility map and the consistency check are off (the same work for both models);
- miss path: one `userembed serve` per model (vector cache off, `--workers` processes),
  FORCE_RECOMPUTE from closed-loop load processes (bench/serving_load.py): one id per call at
  concurrency 64, and 64 ids per call at concurrency 4;
- the encode step alone (`encode_arrow`, features to encoder inputs: the attribute lookup and the
  histogram live here) and onnxruntime alone on those inputs, `--batch-size` users per run.
Each figure is users/s and CPU time per user (this process' for the refresh and the two
alone; the server's, its workers included, for the miss path): CPU time moves much less than
wall time when other jobs share the machine. Ratios are with / without (users/s; users per CPU
second). `--write-md` writes its section of BENCHMARKS.md. Prints a table, then one JSON
object as the last line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.* as a script

from bench.common import log, private_redis, write_section
from bench.item_cost_measure import encoder_alone, miss_rounds, refresh_rounds
from bench.item_cost_models import build_and_train, tile_offline
from bench.item_cost_report import BEGIN, END, figure, markdown, print_table
from bench.transfer import code_version, workspace


@dataclass(frozen=True)
class ItemCostConfig:
    """One run. `train_options`: `userembed train` options beyond its defaults, for both models."""

    copies: int = 10  # MovieLens' 943 users tiled this many times for the throughput runs
    rounds: int = 5
    max_steps: int = 30  # speed does not depend on how well the weights are trained
    seed: int = 0
    threads: int = 1  # torch threads while training: the machine is shared
    train_options: tuple[tuple[str, Any], ...] = (("plots", False),)
    workers: int = 1  # server processes per model (0: the server's default, every core)
    force_calls: int = 1500  # one-id calls per miss-path round, concurrency 64
    batch_calls: int = 60  # 64-id calls per round, concurrency 4
    seconds: float = 2.0  # per encode-step and onnxruntime measurement
    batch_size: int = 1024  # users per encoder run (the refresh's default)
    quick: bool = False

    def options(self) -> dict[str, Any]:
        return {"seed": self.seed, "max_steps": self.max_steps, **dict(self.train_options)}


def quick(cfg: ItemCostConfig) -> ItemCostConfig:
    """--quick: small tables, a few steps, two copies, two short rounds."""
    return replace(
        cfg,
        copies=2,
        rounds=2,
        max_steps=4,
        train_options=(
            ("batch_size", 32),
            ("eval_every", 2),
            ("checkpoint_every", 4),
            ("embedding_dim", 16),
            *cfg.train_options,
        ),
        force_calls=200,
        batch_calls=10,
        seconds=0.3,
        batch_size=256,
        quick=True,
    )


def run(cfg: ItemCostConfig, workdir: Path) -> dict[str, Any]:
    from userembed import feast_ops, paths

    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    code = code_version()
    home = workdir / "home"
    with private_redis(workdir) as url, workspace(home, url):
        store = feast_ops.open_store(url)
        models = build_and_train(cfg, home, store)
        users = tile_offline(paths.offline_dir(), cfg.copies)
        t1 = time.perf_counter()
        feast_ops.materialize(store)
        log(f"tiled {users} users, materialised in {time.perf_counter() - t1:.0f}s")
        alone = encoder_alone(cfg, models)
        refreshed = refresh_rounds(cfg, url)
        miss = miss_rounds(cfg, users)
    figures = {
        "refresh": figure(refreshed),
        "miss_one_id": figure(miss["one_id"]),
        "miss_batch": figure(miss["batch"]),
        "encode": figure(alone["encode"]),
        "onnxruntime": figure(alone["onnxruntime"]),
    }
    return {
        "bench": "item_cost",
        "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python bench/item_cost.py", *sys.argv[1:]]),
        "config": asdict(cfg),
        "code": code,
        "users": users,
        "models": models,
        "figures": figures,
        "miss_errors": miss["errors"],
        "total_seconds": round(time.perf_counter() - t0, 1),
        "cpus": os.cpu_count(),
        "load_avg_1m_start": round(load_start, 2),
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = ItemCostConfig()
    ap.add_argument("--copies", type=int, default=d.copies, help="MovieLens users tiled N times")
    ap.add_argument("--rounds", type=int, default=d.rounds)
    ap.add_argument("--max-steps", type=int, default=d.max_steps)
    ap.add_argument("--workers", type=int, default=d.workers, help="0: the server's default")
    ap.add_argument("--force-calls", type=int, default=d.force_calls)
    ap.add_argument("--batch-calls", type=int, default=d.batch_calls)
    ap.add_argument("--seconds", type=float, default=d.seconds)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--quick", action="store_true", help="tiny: the test's size")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    ap.add_argument("--write-md", action="store_true", help="write the BENCHMARKS.md section")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally blocks stop Redis
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    cfg = ItemCostConfig(
        copies=args.copies,
        rounds=args.rounds,
        max_steps=args.max_steps,
        workers=args.workers,
        force_calls=args.force_calls,
        batch_calls=args.batch_calls,
        seconds=args.seconds,
        batch_size=args.batch_size,
    )
    if args.quick:
        cfg = quick(cfg)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="item-cost-"))
        )
        report = run(cfg, workdir)
    if args.write_md and not cfg.quick:
        write_section(markdown(report), BEGIN, END)
    print_table(report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
