"""Encoder throughput: onnxruntime (CPU) beside PyTorch eager, same model, same inputs.

    .venv/bin/python bench/encoder.py                      # random-init default-size model
    .venv/bin/python bench/encoder.py --run var/runs/X     # a trained run's model.pt

Prints users/s at each batch size for both and the ratio ORT / torch; the last line is one JSON
object. Figures are medians over repeated calls after a warm-up; threads are pinned (default 2).
The load average goes into the JSON: on a shared, oversubscribed machine torch's OpenMP pool
slows down by 10-40x with 2 threads (barrier waits), so compare runs at similar load or use
--threads 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.* as a script

from bench.common import input_spec
from trainer.config import ModelConfig, MoEConfig
from trainer.dense import DenseArch
from trainer.export import ExportableEncoder, export_onnx, random_inputs
from trainer.export.rebuild import final_model, rebuild
from trainer.tables import table_name
from userembed.features import PROFILE_FEATURES, InputSpec
from userembed.onnx_encoder import new_session

SIZES = {
    "item_seq": 100_000,
    "category_seq": 1_000,
    "event_type_seq": 8,
    "gap_bucket_seq": 17,
    **dict.fromkeys(PROFILE_FEATURES, 64),
}


def random_encoder(spec: InputSpec, user_dim: int = 64) -> ExportableEncoder:
    """The trainer's default ModelConfig (D=32, 2 layers, 4 experts top-2) on `spec`, random
    weights (seed 0): the compute of a trained model, whose weights differ, not its work."""
    cfg = ModelConfig(
        input_spec=spec, task_names=("click", "buy"), moe=MoEConfig(), user_dim=user_dim
    )
    torch.manual_seed(0)
    tables = {
        table_name(f.name): torch.randn(f.num_embeddings, cfg.embedding_dim) * 0.1
        for f in spec.sequence_features + spec.profile_features
    }
    return ExportableEncoder(cfg, tables, DenseArch(cfg).eval()).eval()


def default_encoder(sequence_length: int) -> ExportableEncoder:
    """random_encoder on this bench's table sizes (V=64)."""
    return random_encoder(input_spec(sequence_length, SIZES))


def timed(fn, min_s: float, min_reps: int = 5) -> float:  # type: ignore[no-untyped-def]
    """Median seconds per call after 2 warm-up calls."""
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_s:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="run dir with model.pt (default: random model)")
    ap.add_argument("--batches", default="1,64,512")
    ap.add_argument("--sequence-length", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.0, help="minimum time per measurement")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    if args.run:
        enc = rebuild(final_model(args.run))
    else:
        enc = default_encoder(args.sequence_length)
    spec = enc.cfg.input_spec
    rng = np.random.default_rng(0)
    batches = [int(b) for b in args.batches.split(",")]
    inputs = {b: random_inputs(spec, b, rng) for b in batches}

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "encoder.onnx"
        export_onnx(enc, path, inputs[batches[0]])
        sess = new_session(path, args.threads, quiet=True)

    rows = []
    for b in batches:
        x = inputs[b]
        tx = tuple(torch.from_numpy(x[n]) for n in enc.input_names)

        def run_torch(tx: tuple[torch.Tensor, ...] = tx) -> None:
            with torch.inference_mode():
                enc(*tx)

        t_torch = timed(run_torch, args.seconds)
        t_ort = timed(lambda x=x: sess.run(None, x), args.seconds)
        row = {
            "batch": b,
            "torch_users_per_s": round(b / t_torch, 1),
            "ort_users_per_s": round(b / t_ort, 1),
            "torch_ms": round(t_torch * 1e3, 3),
            "ort_ms": round(t_ort * 1e3, 3),
            "ort_over_torch": round(t_torch / t_ort, 2),
        }
        rows.append(row)
        print(
            f"batch {b:4d}: torch {row['torch_users_per_s']:9.1f} users/s ({row['torch_ms']} ms)"
            f"  onnxruntime {row['ort_users_per_s']:9.1f} users/s ({row['ort_ms']} ms)"
            f"  ratio {row['ort_over_torch']}x"
        )
    moe = enc.cfg.moe
    print(
        json.dumps(
            {
                "bench": "encoder",
                "threads": args.threads,
                "load_average_1m": round(os.getloadavg()[0], 2),
                "sequence_length": spec.sequence_length,
                "embedding_dim": enc.cfg.embedding_dim,
                "num_layers": enc.cfg.num_layers,
                "num_experts": moe.num_experts,
                "num_experts_per_tok": moe.num_experts_per_tok,
                "model": args.run or "random-init default config",
                "results": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
