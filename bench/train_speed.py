"""Training speed: samples/s at world size 1 and 2 (gloo, torchrun), and step time with 16
experts vs 4 experts at the same top-k and expert width (bar: at most 1.5x).

    .venv/bin/python bench/train_speed.py --users 5000
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _frame(users: int) -> tuple[Any, Any]:
    from bench.train_quality import frame_from_tables
    from userembed.datasets import generate_synthetic

    events, users_t, labels, spec = generate_synthetic(users, seed=0)
    return frame_from_tables(events, users_t, labels, spec), spec


def measure(users: int, steps: int, batch_size: int, num_experts: int, top_k: int) -> dict:
    """Timed training steps (trainer.step.train_step: forward, backward with the fused sparse
    optimizer, clipping, AdamW) after 5 warm-up steps."""
    import numpy as np
    import torch

    from trainer.batches import encode_split, iterate_batches
    from trainer.distributed import init_distributed
    from trainer.future_loss import encode_future, future_loss_of
    from trainer.model import SuperMoEModel
    from trainer.options import config_for
    from trainer.step import prepare, train_step

    ctx = init_distributed()
    frame, spec = _frame(users)
    cfg = config_for(
        frame,
        tuple(spec.tasks),
        tuple(spec.model_profile_features),
        "/tmp/unused",
        sequence_length=spec.sequence_length,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        batch_size=batch_size,
    )
    train_rows = frame[frame["split"] == "train"]
    cfg = cfg.sized(len(train_rows), ctx.world_size)  # the schedule of `userembed train`
    split = encode_split(train_rows, cfg.model.input_spec, cfg.model.task_names)
    # the default step: the self-supervised objective on
    split.future = encode_future(
        train_rows, cfg.model.input_spec, cfg.future_targets, cfg.future_window_seconds
    )
    torch.manual_seed(0)
    model, optim = prepare(SuperMoEModel(cfg.model, future_loss=future_loss_of(cfg)), cfg, ctx)

    def batches():  # type: ignore[no-untyped-def]
        for epoch in range(10**6):  # as many epochs as the steps need
            yield from iterate_batches(
                split, cfg.model.input_spec, batch_size, epoch, ctx.rank, ctx.world_size
            )

    times = []
    for i, b in enumerate(batches()):
        if i >= steps + 5:
            break
        t0 = time.perf_counter()
        train_step(model, b, optim)
        if i >= 5:
            times.append(time.perf_counter() - t0)
    step = float(np.median(times))
    return {
        "world_size": ctx.world_size,
        "num_experts": num_experts,
        "top_k": top_k,
        "batch_size": batch_size,
        "median_step_s": step,
        "samples_per_s": batch_size * ctx.world_size / step,
        "steps": len(times),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=5000)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, force=True)
    if args.worker:  # one process of the torchrun run
        import torch

        torch.set_num_threads(1)
        r = measure(args.users, args.steps, args.batch_size, 4, 2)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.out).write_text(json.dumps(r))
        return
    import torch

    # One thread per process: on a shared 2-core box more threads oversubscribe (spin-waits),
    # and world size 2 then compares 2 processes x 1 thread with 1 process x 1 thread.
    torch.set_num_threads(args.threads)
    ws1 = measure(args.users, args.steps, args.batch_size, 4, 2)
    e16 = measure(args.users, args.steps, args.batch_size, 16, 2)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ws2.json"
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        subprocess.run(
            [
                torchrun,
                "--standalone",
                "--nproc_per_node=2",
                __file__,
                "--worker",
                "--out",
                str(out),
                "--users",
                str(args.users),
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
            ],
            check=True,
            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        )
        ws2 = json.loads(out.read_text())
    ratio = e16["median_step_s"] / ws1["median_step_s"]
    print(
        f"world size 1: {ws1['samples_per_s']:.0f} samples/s "
        f"(step {ws1['median_step_s'] * 1e3:.0f} ms, batch {args.batch_size})"
    )
    print(
        f"world size 2: {ws2['samples_per_s']:.0f} samples/s "
        f"(step {ws2['median_step_s'] * 1e3:.0f} ms, batch {args.batch_size} per rank)"
    )
    print(
        f"16 vs 4 experts (top-2, same width): step {e16['median_step_s'] * 1e3:.0f} vs "
        f"{ws1['median_step_s'] * 1e3:.0f} ms = {ratio:.2f}x (bar <= 1.5x)"
    )
    print(
        json.dumps(
            {
                "ws1": ws1,
                "ws2": ws2,
                "experts16": e16,
                "ratio_16_vs_4": ratio,
                "bar_ratio_ok": ratio <= 1.5,
            }
        )
    )


if __name__ == "__main__":
    main()
