"""What the pages show, read from the registry, the vector store and the transfer results.

Every reader returns plain frozen records; nothing here writes. What this package may not read
itself (a refresh's record of a version, a recompute through the gRPC server, the pipeline
status) comes in through `UiSources`, filled by userembed.commands.ui.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from userembed.errors import UserEmbedError
from userembed.manifest import FileEntry, Manifest
from userembed.registry import Registry
from userembed.status import Status
from userembed.vectors import DTYPES, EmbeddingVersion, StoredVector, VectorStore

logger = logging.getLogger(__name__)

TRANSFER_GLOB = "*.json"  # bench/results/transfer/<name>.json: one report per data source


@dataclass(frozen=True)
class UiConfig:
    """Where the page reads from and where it listens. `redis_url` is never shown as is
    (userembed.redis_urls.redacted)."""

    redis_url: str
    registry_root: str
    offline_dir: str
    transfer_dir: str
    target: str  # the gRPC server asked for recomputes (shown on the user page)
    report_file: str  # the training report's name among a version's attachments
    host: str = "127.0.0.1"
    port: int = 8470
    projection_sample: int = 2000  # users drawn for the 2-D projection


@dataclass(frozen=True)
class RefreshRecord:
    """What a finished refresh left in an embedding version's metadata (docs/refresh.md)."""

    drift: Mapping[str, Any]
    parts: int
    computed: int
    copied: int
    nonfinite: int
    min_norm: float | None
    max_norm: float | None
    mode: str = ""
    engine: str = ""
    seconds: float | None = None
    finished_at: str = ""


@dataclass(frozen=True)
class Recomputed:
    """A user's vector computed now by the server (FORCE_RECOMPUTE), or why not."""

    vector: np.ndarray | None
    model_version: str = ""
    embedding_version: str = ""
    computed_at_ms: int = 0
    feature_ts_ms: int = 0
    source: str = ""
    error: str = ""


RefreshReader = Callable[[VectorStore, str], RefreshRecord | None]
Recomputer = Callable[[str, str], Recomputed]  # (model, user id)
StatusReader = Callable[[str], Status]  # model -> the pipeline status


@dataclass(frozen=True)
class UiSources:
    refresh_record: RefreshReader
    recompute: Recomputer | None = None  # None: no server to ask
    status: StatusReader | None = None


@dataclass(frozen=True)
class VersionRow:
    """One registry version as the model page lists it."""

    version: str
    created_at: str
    aliases: tuple[str, ...]
    dim: int
    normalization: str
    tasks: tuple[str, ...]
    variants: tuple[str, ...]
    test_auc: Mapping[str, float]
    parity_max_abs_diff: float | None  # fp32 user vector, held-out rows
    size_bytes: int
    has_report: bool


@dataclass(frozen=True)
class EmbeddingRow:
    info: EmbeddingVersion
    record: RefreshRecord | None
    serving: bool


@dataclass(frozen=True)
class EmbeddingState:
    current: str | None
    rows: tuple[EmbeddingRow, ...]  # oldest first

    @property
    def serving(self) -> EmbeddingRow | None:
        return next((r for r in self.rows if r.serving), None)


@dataclass(frozen=True)
class TransferTable:
    """The newest transfer benchmark of one data source: probe AUC per representation."""

    source: str
    generated: str
    command: str
    path: str
    tasks: tuple[str, ...]
    rows: tuple[tuple[str, tuple[tuple[float, float] | None, ...]], ...]  # (rep, (mean, se)...)
    deltas: tuple[tuple[str, tuple[float | None, ...]], ...] = ()  # model - profile, per task
    definitions: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class UserAnswer:
    user_id: str
    model: str
    embedding_version: str | None
    stored: StoredVector | None
    recomputed: Recomputed | None

    @property
    def cosine(self) -> float | None:
        """Cosine between the stored and the recomputed vector, when both exist."""
        if self.stored is None or self.recomputed is None or self.recomputed.vector is None:
            return None
        a, b = self.stored.vector, self.recomputed.vector
        if a.shape != b.shape:
            return None
        den = float(np.linalg.norm(a) * np.linalg.norm(b))
        return float(a @ b) / den if den > 0 else None


def _parity_max_abs_diff(parity: Mapping[str, Any]) -> float | None:
    fp32 = parity.get("fp32")
    if isinstance(fp32, Mapping):
        held = fp32.get("heldout")
        if isinstance(held, Mapping) and "user_vector_max_abs_diff" in held:
            return float(held["user_vector_max_abs_diff"])
    return None


def _test_auc(metrics: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for section in ("test", "future_test"):
        values = metrics.get(section)
        if isinstance(values, Mapping):
            out |= {
                t: float(m["auc"])
                for t, m in values.items()
                if isinstance(m, Mapping) and "auc" in m
            }
    return out


def version_row(m: Manifest, aliases: Sequence[str], report_file: str) -> VersionRow:
    return VersionRow(
        version=m.version,
        created_at=m.created_at,
        aliases=tuple(sorted(aliases)),
        dim=m.vector.dim,
        normalization=m.vector.normalization,
        tasks=m.task_names,
        variants=tuple(v.name for v in m.variants),
        test_auc=_test_auc(m.metrics),
        parity_max_abs_diff=_parity_max_abs_diff(m.parity),
        size_bytes=sum(e.size for e in m.all_files()),
        has_report=_report_entry(m, report_file) is not None,
    )


def model_versions(registry: Registry, model: str, report_file: str) -> list[VersionRow]:
    """Every published version of `model`, newest first, with its aliases."""
    by_version: dict[str, list[str]] = {}
    for alias, version in registry.aliases(model).items():
        by_version.setdefault(version, []).append(alias)
    rows = []
    for version in reversed(registry.list_versions(model)):
        m = registry.read_manifest(model, version)
        rows.append(version_row(m, by_version.get(version, []), report_file))
    return rows


def _report_entry(m: Manifest, report_file: str) -> FileEntry | None:
    return next((e for e in m.attachments if Path(e.path).name == report_file), None)


def training_report(registry: Registry, m: Manifest, report_file: str) -> dict[str, Any] | None:
    """The run's report.json shipped with version `m`, checked against its manifest entry."""
    entry = _report_entry(m, report_file)
    if entry is None:
        return None
    data = registry.fs.cat_file(f"{registry.version_dir(m.model_name, m.version)}/{entry.path}")
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise UserEmbedError(f"{m.ref}: {entry.path} does not match its manifest sha256")
    report = json.loads(data)
    return report if isinstance(report, dict) else None


def embedding_state(store: VectorStore, reader: RefreshReader) -> EmbeddingState:
    current = store.current_version()
    rows = tuple(
        EmbeddingRow(v, reader(store, v.id), v.id == current) for v in store.list_versions()
    )
    return EmbeddingState(current, rows)


def vector_bytes(dim: int, users: int, dtype: str = "f32") -> int:
    """The raw vector payload of a version (Redis adds its own per-key overhead)."""
    return dim * DTYPES[dtype].itemsize * users


def drift_series(state: EmbeddingState) -> list[tuple[str, str, Mapping[str, Any]]]:
    """(version, against, drift report) of every kept version whose refresh compared it with
    the version it replaced, oldest first."""
    out = []
    for row in state.rows:
        drift = row.record.drift if row.record else {}
        if drift.get("against") and ("knn_overlap" in drift or "mean_cosine" in drift):
            out.append((row.info.id, str(drift["against"]), drift))
    return out


def _cell(entry: Any) -> tuple[float, float] | None:
    if isinstance(entry, Mapping) and "mean" in entry:
        return float(entry["mean"]), float(entry.get("se", 0.0))
    return None


def transfer_tables(folder: str | Path) -> list[TransferTable]:
    """The newest transfer report of each data source in `folder` (read as data: the bench's
    code is not imported). A file of another shape is skipped with a log line."""
    newest: dict[str, TransferTable] = {}
    for path in sorted(Path(folder).glob(TRANSFER_GLOB)) if Path(folder).is_dir() else []:
        try:
            report = json.loads(path.read_text())
            summary = report["summary"]
            probe: Mapping[str, Mapping[str, Any]] = summary["probe"]
            definitions = dict(report.get("definitions", {}))
            tasks = (*definitions, "mean") if definitions else tuple(next(iter(probe.values())))
            rows = tuple(
                (rep, tuple(_cell(values.get(t)) for t in tasks)) for rep, values in probe.items()
            )
            deltas = tuple(
                (rep, tuple((c[0] if (c := _cell(values.get(t))) else None) for t in tasks))
                for rep, values in summary.get("vs_profile", {}).items()
            )
            table = TransferTable(
                # the source, `-items` for a run with the items table (bench/transfer_report.py)
                source=str(report.get("section", report.get("source", path.stem))),
                generated=str(report.get("generated", "")),
                command=str(report.get("command", "")),
                path=str(path),
                tasks=tuple(tasks),
                rows=rows,
                deltas=deltas,
                definitions=definitions,
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration) as e:
            logger.info("skipping %s: not a transfer report (%s)", path, e)
            continue
        known = newest.get(table.source)
        if known is None or table.generated > known.generated:
            newest[table.source] = table
    return [newest[s] for s in sorted(newest)]


def user_answer(store: VectorStore, user_id: str, recompute: Recomputer | None) -> UserAnswer:
    """The stored vector of `user_id` in the version readers follow, and (with a recomputer)
    the server's answer computed now. `user_id` must be canonical (userembed.ids)."""
    ev = store.current_version()
    stored = store.read(ev, [user_id])[0] if ev else None
    again = recompute(store.keys.model, user_id) if recompute is not None else None
    return UserAnswer(user_id, store.keys.model, ev, stored, again)
