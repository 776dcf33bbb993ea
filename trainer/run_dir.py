"""One training run's folder: the only place that spells its layout.

`userembed train` writes $USEREMBED_HOME/runs/<run id>/ (userembed.paths.runs_dir()); tests
and benchmarks use any folder. Inside it:

    model.pt                        the final model (best evaluation): model_config, full
                                    tables, dense_arch state; what the export reads
    heldout_inputs.npz              up to 512 encoded test rows: the export's parity inputs
    item_attributes.npz             with item attributes only: the model's item attribute map
                                    (userembed.items), which the export ships with the ONNX
    train_config.json               the TrainConfig; `--resume` reads it back
    report.json                     test metrics, expert load, history, config
    loss.png, auc.png, expert_load.png      plots (TrainConfig.plots)
    checkpoints/latest-rank<r>.pt   resume state, one per rank
    teachers/<task>-s<seed>/        `--distill` only: a single-task teacher, itself a run folder
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.config import TrainConfig
from userembed.items import ItemAttributeMap

FINAL_CHECKPOINT = "model.pt"
HELDOUT_INPUTS = "heldout_inputs.npz"
HELDOUT_ROWS = 512  # test rows kept in HELDOUT_INPUTS
ITEM_ATTRIBUTES = "item_attributes.npz"
TRAIN_CONFIG = "train_config.json"
REPORT_FILE = "report.json"
PLOT_FILES = ("loss.png", "auc.png", "expert_load.png")
CHECKPOINT_DIR = "checkpoints"
TEACHERS_DIR = "teachers"


class RunDir:
    """Paths of one run folder; the only place that spells them."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.model = self.root / FINAL_CHECKPOINT
        self.heldout_inputs = self.root / HELDOUT_INPUTS
        self.train_config = self.root / TRAIN_CONFIG
        self.report = self.root / REPORT_FILE
        self.item_attributes = self.root / ITEM_ATTRIBUTES

    def items(self) -> ItemAttributeMap | None:
        """The run's item attribute map; None for a model without item attributes."""
        return (
            ItemAttributeMap.load(self.item_attributes) if self.item_attributes.is_file() else None
        )

    def plot(self, name: str) -> Path:
        """One of PLOT_FILES."""
        if name not in PLOT_FILES:
            raise ValueError(f"unknown plot {name!r}; expected one of {PLOT_FILES}")
        return self.root / name

    def plots(self) -> list[Path]:
        """The plots this run wrote (none with plots=False)."""
        return [p for p in map(self.plot, PLOT_FILES) if p.is_file()]

    def checkpoint(self, rank: int) -> Path:
        """Rank `rank`'s resume state: every rank checkpoints its own shards."""
        return self.root / CHECKPOINT_DIR / f"latest-rank{rank}.pt"

    def teacher(self, task: str, seed: int) -> Path:
        """The run folder of `task`'s single-task teacher at `seed` (`--distill`)."""
        return self.root / TEACHERS_DIR / f"{task}-s{seed}"

    def write_config(self, cfg: TrainConfig) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.train_config.write_text(json.dumps(cfg.to_dict(), indent=2))

    def read_config(self) -> TrainConfig:
        return TrainConfig.from_dict(json.loads(self.train_config.read_text()))
