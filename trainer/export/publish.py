"""export_model: a trained run -> ONNX files checked against PyTorch -> a registry version.

Parity is part of the export (parity.py): any failed check raises ExportParityError before
anything is published. The run's report and plots travel with the model; the manifest
carries the figures, the training config and the parity results.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from trainer.config import ModelConfig
from trainer.export.coverage import expert_covering_inputs
from trainer.export.inputs import heldout_rows
from trainer.export.onnx_files import (
    DEFAULT_EXTERNAL_DATA_THRESHOLD_MB,
    VARIANTS,
    export_onnx,
    make_variant,
    save_with_external_data,
)
from trainer.export.parity import (
    MAX_ABS_DIFF,
    ParityCheck,
    check_experts_in_graph,
    check_parity,
)
from trainer.export.rebuild import ExportableEncoder, final_model, rebuild
from trainer.run_dir import ITEM_ATTRIBUTES, REPORT_FILE, RunDir
from userembed.errors import DataNotFoundError, InvalidInputError
from userembed.features import PROFILE_INPUT, SERVING_FEATURE_SERVICE
from userembed.manifest import FileEntry, Manifest, OnnxVariant, VectorSpec
from userembed.registry import DEFAULT_MODEL, Registry

logger = logging.getLogger(__name__)

REPORT_METRIC_KEYS = ("test", "expert_load", "steps", "best_step", "stopped_early")
PLOTS_DIR = "plots"  # in the registry version: the run's plots


@dataclass(frozen=True)
class ExportResult:
    manifest: Manifest  # as published (version set)
    registry_root: str
    parity: dict[str, Any]

    @property
    def version(self) -> str:
        return self.manifest.version


def export_model(
    run: str | Path,
    registry_root: str | None = None,
    model_name: str = DEFAULT_MODEL,
    variants: Sequence[str] = ("fp32",),
    *,
    heldout: Mapping[str, np.ndarray] | str | Path | None = None,
    external_data_threshold_mb: float = DEFAULT_EXTERNAL_DATA_THRESHOLD_MB,
    max_abs_diff: float = MAX_ABS_DIFF,
    seed: int = 0,
    aliases: Sequence[str] = ("latest",),
) -> ExportResult:
    """Export a run (folder with model.pt, or the model.pt itself) and publish it.

    Held-out rows: `heldout` (arrays, or a .npz/.parquet path), else the run's
    heldout_inputs.npz, else random rows from the InputSpec (recorded as such in the parity
    figures). Raises ExportParityError (nothing published) when a check fails.
    """
    model_pt = final_model(run)
    run_dir = RunDir(model_pt.parent)
    bad = [v for v in variants if v not in VARIANTS]
    if bad or "fp32" not in variants:
        raise InvalidInputError(f"variants must include fp32 and be fp32/fp16/int8, got {variants}")
    t0 = time.monotonic()
    enc = rebuild(model_pt)
    cfg = enc.cfg
    held, held_source = heldout_rows(heldout, run_dir, cfg.input_spec, np.random.default_rng(seed))
    crafted, coverage = expert_covering_inputs(enc, seed=seed)
    staging = Path(tempfile.mkdtemp(prefix="userembed-export-"))
    try:
        raw = staging / "raw.onnx"
        export_onnx(enc, raw, held if len(held[PROFILE_INPUT]) else crafted)
        parity: dict[str, Any] = {
            "threshold_max_abs_diff": max_abs_diff,
            "heldout_source": held_source,
            "heldout_rows": int(held[PROFILE_INPUT].shape[0]),
            "crafted_rows": int(crafted[PROFILE_INPUT].shape[0]),
            "expert_coverage": coverage,
        }
        (staging / "onnx").mkdir()
        fp32_path = staging / "onnx" / "encoder_fp32.onnx"
        ext = save_with_external_data(raw, fp32_path, external_data_threshold_mb)
        raw.unlink()
        parity["experts_in_graph"] = check_experts_in_graph(enc, fp32_path)
        check = ParityCheck(enc, held, crafted)
        parity["fp32"] = fp32 = check.fp32(fp32_path, model_pt)
        check_parity(parity, max_abs_diff)

        entries = [_variant("fp32", staging, fp32_path, ext, enc)]
        for name in variants:
            if name == "fp32":
                continue
            path = staging / "onnx" / f"encoder_{name}.onnx"
            v_ext = make_variant(name, fp32_path, path, external_data_threshold_mb)
            parity[name] = check.variant(name, path)
            entries.append(_variant(name, staging, path, v_ext, enc))

        attachments, metrics = _attachments(run_dir, staging)
        item_attributes = _item_attributes(run_dir, staging, cfg)
        manifest = Manifest(
            model_name=model_name,
            vector=VectorSpec(dim=cfg.user_dim, dtype="float32", normalization="l2"),
            # The run read the training service; the served model reads the serving one.
            input_spec=replace(cfg.input_spec, feature_service=SERVING_FEATURE_SERVICE),
            variants=tuple(entries),
            task_names=tuple(cfg.task_names),
            metrics=metrics,
            training_config=_training_config(run_dir, cfg),
            parity=parity,
            attachments=attachments,
            item_attributes=item_attributes,
        )
        published = Registry(registry_root).publish(manifest, staging, aliases=tuple(aliases))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "exported %s/%s in %.1fs: user vector max |ort - torch| held-out %.2e, crafted %.2e",
        model_name,
        published.version,
        time.monotonic() - t0,
        fp32["heldout"]["user_vector_max_abs_diff"],
        fp32["crafted"]["user_vector_max_abs_diff"],
    )
    return ExportResult(
        manifest=published, registry_root=Registry(registry_root).root, parity=parity
    )


def _variant(
    name: str, staging: Path, path: Path, ext: tuple[str, ...], enc: ExportableEncoder
) -> OnnxVariant:
    rel = path.relative_to(staging).as_posix()
    parent = path.parent.relative_to(staging).as_posix()
    return OnnxVariant(
        name=name,
        file=FileEntry.of(staging, rel),
        inputs=enc.input_names,
        outputs=enc.output_names,
        external_data=tuple(FileEntry.of(staging, f"{parent}/{e}") for e in ext),
    )


def _attachments(run: RunDir, staging: Path) -> tuple[tuple[FileEntry, ...], dict[str, Any]]:
    """The run's evaluation report and plots travel with the model; metrics come from it."""
    entries: list[FileEntry] = []
    metrics: dict[str, Any] = {}
    if run.report.is_file():
        shutil.copy2(run.report, staging / REPORT_FILE)
        entries.append(FileEntry.of(staging, REPORT_FILE))
        try:
            data = json.loads(run.report.read_text())
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{run.report}: not valid JSON ({e})") from e
        if isinstance(data, dict):  # the figures, not the history or the config (kept apart)
            metrics = {k: data[k] for k in REPORT_METRIC_KEYS if k in data}
    for p in sorted(run.plots()):
        rel = f"{PLOTS_DIR}/{p.name}"
        (staging / PLOTS_DIR).mkdir(exist_ok=True)
        shutil.copy2(p, staging / rel)
        entries.append(FileEntry.of(staging, rel))
    return tuple(entries), metrics


def _item_attributes(run: RunDir, staging: Path, cfg: ModelConfig) -> FileEntry | None:
    """The run's item attribute map, shipped in the entry (its sha256 in the manifest): the
    server and the refresh look each event's item up in it before the encoder runs."""
    if not cfg.input_spec.item_attributes:
        return None
    if not run.item_attributes.is_file():
        raise DataNotFoundError(
            f"{run.item_attributes}: the model reads item attributes but its run has no map"
        )
    shutil.copy2(run.item_attributes, staging / ITEM_ATTRIBUTES)
    return FileEntry.of(staging, ITEM_ATTRIBUTES)


def _training_config(run: RunDir, cfg: ModelConfig) -> dict[str, Any]:
    """The run's saved TrainConfig as a dict; just the model's config without one."""
    if not run.train_config.is_file():
        return {"model": cfg.to_dict()}
    try:
        return dict(json.loads(run.train_config.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise InvalidInputError(f"{run.train_config}: not a JSON object ({e})") from e
