"""Performance suite: every performance figure beside its reference, measured in the same run.

    .venv/bin/python bench/perf.py                  # full sizes (tens of minutes on 2 cores)
    .venv/bin/python bench/perf.py --smoke          # tiny sizes: checks the plumbing only
    .venv/bin/python bench/perf.py --only encoder,training --write-md

Runs the area benchmarks as subprocesses and reads the JSON object each prints as its last
line: bench/serving.py (stored path, batch path, miss path), bench/refresh.py, bench/encoder.py
(onnxruntime vs PyTorch eager), bench/data_gen.py, training throughput
(bench/train_speed.py: world size 1 vs 2, 16 vs 4 experts) and MoE scaling (this file's
`--role train-speed`: dense transformer vs top-2 MoE with 2 / 4 / 8 experts).
It adds its own reference: redis-benchmark GET against a private redis-server, for the stored
path. Each figure is reported as value, reference, ratio. The last line is one JSON object;
--write-md replaces the perf section of BENCHMARKS.md. `--only X --merge --out FILE` re-measures
the suites X and keeps the others' results from FILE (a saved report), so one area can be
re-measured without re-running (and re-drawing the noise of) the rest; each suite's table rows
then say when they were measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.* as a script

from bench.common import ROOT, write_section
from bench.perf_figures import (
    Figure,
    data_figures,
    encoder_figures,
    moe_scaling_figures,
    refresh_figures,
    serving_figures,
    training_figures,
)
from bench.perf_refs import redis_benchmark, train_speed
from bench.perf_report import BEGIN, END, markdown

logger = logging.getLogger("bench.perf")

BENCH = ROOT / "bench"


@dataclass(frozen=True)
class Suite:
    name: str
    script: str
    presets: dict[str, tuple[str, ...]]  # full / quick / smoke -> the script's arguments
    timeout_s: int
    figures: Callable[[dict[str, Any], dict[str, Any]], list[Figure]]


PRESETS: tuple[str, ...] = ("full", "quick", "smoke")
SUITES: tuple[Suite, ...] = (
    Suite(
        "serving", "serving.py",
        {
            "full": ("--users", "20000"),
            # 5 alternating rounds: on a shared machine single runs swing 2-5x
            "quick": ("--users", "20000", "--scale", "0.25", "--rss-requests", "20000",
                      "--rounds", "5"),
            "smoke": ("--users", "200", "--feast-users", "100", "--scale", "0.02",
                      "--zipf-users", "2000",
                      "--no-feast-serve", "--rss-requests", "0",
                      "--baseline-env", "USEREMBED_READ_HOLD_MS=0"),
        },
        1800, serving_figures,
    ),
    Suite(
        "refresh", "refresh.py",
        {
            "full": ("--users", "1000000"),
            "quick": ("--users", "50000", "--ort-seconds", "2"),
            "smoke": ("--users", "2000", "--ort-seconds", "0.3", "--part-rows", "1000",
                      "--batch-size", "256"),
        },
        3600, refresh_figures,
    ),
    Suite(
        # 1 thread: under load 2 torch threads collapse (OpenMP spin-waits), ORT much less.
        "encoder", "encoder.py",
        {
            "full": ("--batches", "1,64,512", "--threads", "1"),
            "quick": ("--batches", "1,64,512", "--threads", "1", "--seconds", "1"),
            "smoke": ("--batches", "1,16", "--seconds", "0.2", "--sequence-length", "12",
                      "--threads", "1"),
        },
        900, encoder_figures,
    ),
    Suite(
        "data", "data_gen.py",
        {"full": ("--users", "1000000"), "quick": ("--users", "100000"), "smoke": ("--users", "2000")},
        1800, data_figures,
    ),
    Suite(
        "training", "train_speed.py",
        {
            "full": ("--users", "5000"),
            "quick": ("--users", "2000", "--steps", "10"),
            "smoke": ("--users", "500", "--steps", "3", "--batch-size", "32"),
        },
        1800, training_figures,
    ),
    Suite(
        "moe_scaling", "perf.py",
        {
            "full": ("--role", "train-speed"),
            "quick": ("--role", "train-speed"),
            "smoke": ("--role", "train-speed", "--smoke"),
        },
        900, moe_scaling_figures,
    ),
)  # fmt: skip


def last_json(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON object line in the output")


def run_suite(suite: Suite, preset: str) -> dict[str, Any]:
    """Run one area script; -> {"ok", "seconds", "result" | "error"}."""
    script = BENCH / suite.script
    args = list(suite.presets[preset])
    if not script.exists():
        return {"ok": False, "error": f"bench/{suite.script} not found", "seconds": 0.0}
    cmd = [sys.executable, str(script), *args]
    logger.info("%s: %s", suite.name, " ".join(cmd[1:]))
    stamp = {
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=suite.timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return {
            "ok": False,
            "error": f"timeout after {suite.timeout_s}s",
            "seconds": suite.timeout_s,
        }
    seconds = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {
            "ok": False,
            "error": f"exit {proc.returncode}: " + " | ".join(tail),
            "seconds": seconds,
        }
    try:
        return {
            "ok": True,
            "result": last_json(proc.stdout),
            "seconds": seconds,
            "command": cmd[1:],
            **stamp,
        }
    except ValueError as e:
        return {"ok": False, "error": str(e), "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", default="suite", choices=["suite", "train-speed"])
    ap.add_argument("--smoke", action="store_true", help="= --preset smoke: plumbing only")
    ap.add_argument("--preset", default="full", choices=PRESETS, help="sizes (see SUITES)")
    ap.add_argument(
        "--only", default=None, help="comma list of suites: " + ",".join(s.name for s in SUITES)
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (train-speed role)")
    ap.add_argument("--redis-requests", type=int, default=100_000)
    ap.add_argument(
        "--write-md", action="store_true", help="replace the perf section of BENCHMARKS.md"
    )
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the suites not in --only (and their references) from the report at --out",
    )
    ap.add_argument("--render", type=Path, default=None, help="only rewrite the md from a report")
    args = ap.parse_args(argv)
    if args.render:  # re-render a saved report (figures recomputed from the raw results)
        report = json.loads(args.render.read_text())
        figs = [
            f
            for s in SUITES
            if report["suites"].get(s.name, {}).get("ok")
            for f in s.figures(report["suites"][s.name]["result"], report["references"])
        ]
        report["figures"] = [f.to_dict() for f in figs]
        args.render.write_text(json.dumps(report, indent=2) + "\n")
        write_section(markdown(report), BEGIN, END)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.role == "train-speed":
        print(json.dumps(train_speed(args.smoke, args.threads)))
        return 0

    preset = "smoke" if args.smoke else args.preset
    wanted = set(args.only.split(",")) if args.only else {s.name for s in SUITES}
    unknown = wanted - {s.name for s in SUITES}
    if unknown:
        ap.error(f"unknown suites: {sorted(unknown)}")
    saved: dict[str, Any] = {}
    if args.merge:
        if args.out is None or not args.out.exists():
            ap.error("--merge needs --out pointing at a saved report")
        saved = json.loads(args.out.read_text())
        if saved.get("preset") != preset:
            ap.error(f"--merge: {args.out} was measured with preset {saved.get('preset')!r}")
        for v in saved["suites"].values():  # rows of older reports: their report's time
            v.setdefault("measured", saved["generated"])
            v.setdefault("load_average_1m", saved.get("load_average_1m"))
    load = round(os.getloadavg()[0], 2)
    refs: dict[str, Any] = dict(saved.get("references", {}))
    if "serving" in wanted:
        n = 2_000 if preset == "smoke" else args.redis_requests
        refs["redis_benchmark"] = redis_benchmark((1, 16, 64), n)
        logger.info("redis-benchmark GET req/s: %s", refs["redis_benchmark"])
    suites: dict[str, Any] = {}
    figures: list[Figure] = []
    for suite in SUITES:
        if suite.name not in wanted:
            if suite.name in saved.get("suites", {}):
                suites[suite.name] = res = saved["suites"][suite.name]
                if res["ok"]:
                    figures += suite.figures(res["result"], refs)
            continue
        res = run_suite(suite, preset)
        suites[suite.name] = res
        if res["ok"]:
            figs = suite.figures(res["result"], refs)
            figures += figs
            for f in figs:
                logger.info(
                    "%s | %s = %s %s | %s = %s | ratio %s",
                    f.suite, f.name, f.value, f.unit, f.reference, f.reference_value, f.ratio,
                )  # fmt: skip
        else:
            logger.warning("%s not measured: %s", suite.name, res["error"])
    report = {
        "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(
            ["python bench/perf.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "preset": preset,
        "merged": bool(args.merge),
        "load_average_1m": load,
        "references": refs,
        "figures": [f.to_dict() for f in figures],
        "suites": suites,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.write_md and preset != "smoke":
        write_section(markdown(report), BEGIN, END)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
