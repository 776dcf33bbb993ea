"""The smallest demo data the web page (userembed ui) has something to show for, built in
seconds from real parts: the tiny ONNX encoder (tests/tiny_model.py) published twice to a real
registry with a training report attached, offline tables of the refresh tests
(tests/refresh/support.py), four real refresh runs into a real Redis (so drift and validation
records are the refresh's own), and a transfer report in the bench's shape."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import onnx

from refresh.job import refresh
from tests.refresh.support import offline_tables, refresh_config, write_offline
from tests.tiny_model import DIM, MODEL, SPEC, tiny_encoder
from trainer.run_dir import REPORT_FILE
from userembed.manifest import FileEntry, single_onnx_manifest
from userembed.registry import LATEST, Registry

TASKS = ("click", "purchase")


@dataclass(frozen=True)
class Demo:
    registry_root: str
    offline_dir: str
    transfer_dir: str
    model_versions: tuple[str, ...]
    embedding_versions: tuple[str, ...]


def training_report(seed: int) -> dict:
    """A report.json of the trainer's shape (trainer/report.py) with made-up figures."""
    steps = [50, 100, 150, 200]
    val = [
        {
            "step": s,
            "auc": {t: 0.6 + 0.02 * i + 0.01 * j + 0.005 * seed for j, t in enumerate(TASKS)},
        }
        for i, s in enumerate(steps)
    ]
    return {
        "steps": 200,
        "best_step": 150,
        "stopped_early": False,
        "test": {t: {"auc": 0.66 + 0.01 * j + 0.005 * seed} for j, t in enumerate(TASKS)},
        "expert_load": [
            {"layer": 0, "token_share": [0.3, 0.25, 0.25, 0.2], "train_dropped_share": 0.0},
            {"layer": 1, "token_share": [0.22, 0.28, 0.24, 0.26], "train_dropped_share": 0.0},
        ],
        "history": {"train": [], "validation": val},
    }


def publish(registry: Registry, staging: Path, seed: int) -> str:
    """The tiny encoder with a training report, metrics and an export parity record."""
    d = staging / f"v{seed}"
    d.mkdir(parents=True, exist_ok=True)
    onnx.save(tiny_encoder(SPEC, DIM, seed), str(d / "encoder.onnx"))
    report = training_report(seed)
    (d / REPORT_FILE).write_text(json.dumps(report))
    manifest = replace(
        single_onnx_manifest(MODEL, d, SPEC, DIM),
        task_names=TASKS,
        metrics={k: report[k] for k in ("test", "expert_load", "steps", "best_step")},
        parity={
            "fp32": {
                "heldout": {"rows": 64, "user_vector_max_abs_diff": 1.5e-7},
                "crafted": {"rows": 32, "user_vector_max_abs_diff": 2.1e-7},
            }
        },
        attachments=(FileEntry.of(d, REPORT_FILE),),
    )
    return registry.publish(manifest, d, aliases=(LATEST,)).version


def transfer_report(folder: Path) -> None:
    """One transfer result in the shape bench/transfer_report.py writes (the part read)."""
    folder.mkdir(parents=True, exist_ok=True)
    tasks = {"activity": "planted activity above the median", "gender": "held-out profile"}

    def cells(base: float) -> dict:
        out = {t: {"mean": base + 0.01 * i, "se": 0.002, "n": 2} for i, t in enumerate(tasks)}
        return out | {"mean": {"mean": base + 0.005, "se": 0.001, "n": 2}}

    summary = {
        "probe": {"profile": cells(0.9), MODEL: cells(0.85), "mmoe": cells(0.8)},
        "vs_profile": {MODEL: cells(-0.05), "mmoe": cells(-0.1)},
    }
    report = {
        "generated": "2026-12-07 08:31 UTC",
        "command": "python bench/transfer.py --source synthetic",
        "source": "synthetic",
        "definitions": tasks,
        "summary": summary,
    }
    (folder / "transfer_synthetic.json").write_text(json.dumps(report))


def build(root: Path, redis_url: str, users: int = 300) -> Demo:
    """Two model versions, four refreshes (two per model version), a transfer report."""
    registry = Registry(root / "models")
    offline = write_offline(root / "offline", *offline_tables(users, seed=1))
    cfg = refresh_config(
        registry,
        redis_url,
        offline,
        part_rows=200,
        batch_size=128,
        keep=5,
        drift_sample=100,
        intra_op_threads=1,
    )
    versions, evs = [], []
    for seed in (0, 1):
        versions.append(publish(registry, root / "staging", seed))
        evs += [refresh(cfg).embedding_version for _ in range(2)]
    transfer_report(root / "transfer")
    return Demo(registry.root, str(offline), str(root / "transfer"), tuple(versions), tuple(evs))
