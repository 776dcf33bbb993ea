"""References the perf suite measures itself: redis-benchmark GET against a private redis-server,
and the built-in training throughput / MoE-scaling run (`perf.py --role train-speed`)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from bench.common import input_spec, private_redis

logger = logging.getLogger("bench.perf")


def redis_benchmark(concurrencies: tuple[int, ...], requests: int) -> dict[str, float]:
    """GET req/s of redis-benchmark (-d 256) per concurrency against a private redis-server."""
    server, tool = shutil.which("redis-server"), shutil.which("redis-benchmark")
    if not server or not tool:
        logger.warning("redis-server / redis-benchmark not installed: no redis reference")
        return {}
    with tempfile.TemporaryDirectory() as tmp, private_redis(Path(tmp)) as url:
        port = str(urlparse(url).port)
        out: dict[str, float] = {}
        for c in concurrencies:
            res = subprocess.run(
                [tool, "-p", port, "-t", "get", "-n", str(requests), "-c", str(c), "-d", "256",
                 "--csv"],
                capture_output=True, text=True, timeout=300, check=True,
            )  # fmt: skip
            out[str(c)] = _parse_csv_rps(res.stdout)
        return out


def _parse_csv_rps(text: str) -> float:
    """redis-benchmark --csv: header line, then "GET","<rps>",... (quoted)."""
    for line in text.strip().splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells and cells[0].upper().startswith("GET"):
            return float(cells[1])
    raise ValueError(f"no GET row in redis-benchmark output: {text[:200]!r}")


def train_speed(smoke: bool, threads: int) -> dict[str, Any]:
    """Training samples/s of the trainer's own step (trainer.step.train_step: TorchRec lookup,
    dense arch, backward with the fused Adagrad, clipping, AdamW) on random batches: dense transformer (reference) vs SUPERMOE top-2
    with 2 / 4 / 8 experts. Active FFN compute per token is the same in all, so MoE scaling
    shows as the throughput kept while total parameters grow."""
    import numpy as np
    import torch

    from trainer.batches import EncodedSplit, iterate_batches
    from trainer.config import ModelConfig, MoEConfig, TrainConfig
    from trainer.distributed import DistContext
    from trainer.export import random_inputs
    from trainer.model import SuperMoEModel
    from trainer.step import prepare, train_step
    from userembed.features import PROFILE_FEATURES, SEQUENCE_FEATURES

    torch.set_num_threads(threads)
    length, batch, steps = (12, 32, 3) if smoke else (50, 256, 12)
    sizes = {"item_seq": 10_000, "category_seq": 32, "event_type_seq": 8, "gap_bucket_seq": 16}
    spec = input_spec(length, sizes | dict.fromkeys(PROFILE_FEATURES, 64))
    rng = np.random.default_rng(0)
    x = random_inputs(spec, batch * steps, rng)
    labels = rng.integers(0, 2, size=(batch * steps, 2)).astype(np.float32)
    split = EncodedSplit({f: x[f] for f in SEQUENCE_FEATURES}, x["profile"], labels)
    base = MoEConfig()
    variants = {
        "dense": MoEConfig(moe_every=3, expert_hidden=base.expert_hidden * 2),
        "moe-2x": MoEConfig(num_experts=2),
        "moe-4x": MoEConfig(num_experts=4),
        "moe-8x": MoEConfig(num_experts=8),
    }
    rows = []
    for name, moe in variants.items():
        torch.manual_seed(0)
        cfg = TrainConfig(
            "unused", ModelConfig(input_spec=spec, task_names=("a", "b"), moe=moe)
        ).sized(len(split))
        net = SuperMoEModel(cfg.model)
        n_params = sum(p.numel() for p in net.dense_arch.parameters())
        model, optim = prepare(net, cfg, DistContext())
        batches = list(iterate_batches(split, spec, batch))
        times = []
        for b in batches[:1] + batches:  # first = warm-up
            t = time.perf_counter()
            train_step(model, b, optim)
            times.append(time.perf_counter() - t)
        med = float(np.median(times[1:]))
        rows.append(
            {
                "name": name,
                "num_experts": 0 if name == "dense" else moe.num_experts,
                "dense_params": int(n_params),
                "step_ms": round(med * 1e3, 1),
                "samples_per_s": round(batch / med, 1),
            }
        )
        logger.info("train speed %s: %s", name, rows[-1])
    return {
        "bench": "train_speed",
        "threads": threads,
        "batch_size": batch,
        "sequence_length": length,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "rows": rows,
    }
