"""DatasetSpec: what a data set is for, saved as JSON next to its tables.

It records the tasks, which profile attributes a model may use and which are held out for
transfer probes, the cut times (label timestamps) and their split, the label horizon, and for
synthetic data the Bayes-optimal AUC per task on the test split. The trainer reads it to split
the training frame and to know its tasks; nothing else has to guess.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

SPEC_FILE = "spec.json"
SPLITS: tuple[str, ...] = ("train", "validation", "test")


def to_utc(ts: Any) -> pd.Timestamp:
    """Any timestamp-like -> tz-aware UTC pandas Timestamp (naive values are taken as UTC)."""
    t = pd.Timestamp(ts)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


@dataclass(frozen=True)
class DatasetSpec:
    """A data set's contract with the trainer. Times are ISO-8601 UTC strings (JSON-friendly)."""

    name: str
    tasks: tuple[str, ...]
    model_profile_features: tuple[str, ...]
    heldout_profile_features: tuple[str, ...]
    train_cuts: tuple[str, ...]
    validation_cuts: tuple[str, ...]
    test_cuts: tuple[str, ...]
    data_start: str
    data_end: str  # the final snapshot time: what serving materialises
    label_horizon_seconds: int | None = None
    # The window (cut, cut + w] of the self-supervised future targets (userembed.future_targets);
    # None until `data build` computed them.
    future_window_seconds: int | None = None
    sequence_length: int = 50
    bayes_auc: Mapping[str, float] = field(default_factory=dict)  # synthetic only, test split
    label_definitions: Mapping[str, str] = field(default_factory=dict)
    notes: str = ""

    # --- times -----------------------------------------------------------------------------
    @property
    def cut_times(self) -> tuple[pd.Timestamp, ...]:
        """All cuts, oldest first."""
        cuts = self.train_cuts + self.validation_cuts + self.test_cuts
        return tuple(sorted(to_utc(c) for c in cuts))

    @property
    def snapshot_times(self) -> tuple[pd.Timestamp, ...]:
        """Cuts plus the final snapshot at data_end (deduplicated, oldest first)."""
        return tuple(sorted(set(self.cut_times) | {to_utc(self.data_end)}))

    def split_of(self, label_timestamps: pd.Series) -> pd.Series:
        """Label timestamps -> 'train' / 'validation' / 'test' (None for a time not a cut)."""
        ts = pd.to_datetime(label_timestamps, utc=True)
        out = pd.Series(np.full(len(ts), None, dtype=object), index=ts.index)
        for split, cuts in zip(
            SPLITS, (self.train_cuts, self.validation_cuts, self.test_cuts), strict=True
        ):
            out[ts.isin([to_utc(c) for c in cuts])] = split
        return out

    # --- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bayes_auc"] = dict(self.bayes_auc)
        d["label_definitions"] = dict(self.label_definitions)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DatasetSpec:
        tuples = (
            "tasks",
            "model_profile_features",
            "heldout_profile_features",
            "train_cuts",
            "validation_cuts",
            "test_cuts",
        )
        kw: dict[str, Any] = {k: (tuple(v) if k in tuples else v) for k, v in d.items()}
        return cls(**kw)

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        return self.write(folder / SPEC_FILE)

    def write(self, path: Path) -> Path:
        """The JSON at exactly `path` (a staged file, userembed.staged_files)."""
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> DatasetSpec:
        path = Path(path)
        if path.is_dir():
            path = path / SPEC_FILE
        return cls.from_dict(json.loads(path.read_text()))


def iso(ts: pd.Timestamp) -> str:
    return to_utc(ts).isoformat()


def split_cuts(
    cuts: list[pd.Timestamp],
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Oldest cuts train, the second newest validation, the newest test (needs >= 3 cuts).

    With 2 cuts: train + test; with 1: test only (a data set to score, not to train on).
    """
    s = [iso(c) for c in sorted(cuts)]
    if len(s) >= 3:
        return tuple(s[:-2]), (s[-2],), (s[-1],)
    if len(s) == 2:
        return (s[0],), (), (s[1],)
    return (), (), tuple(s)
