"""The validate step of a refresh: the checks a new embedding version must pass before readers
are switched to it, and the drift report against the version it replaces."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from refresh.checkpoint import PartResult
from userembed.manifest import Manifest
from userembed.vectors import VectorStore

logger = logging.getLogger(__name__)

L2_TOLERANCE = 1e-3  # unit vectors from an fp32 encoder: |norm - 1| well below this


@dataclass(frozen=True)
class NormBounds:
    min_norm: float
    max_norm: float

    def contains(self, lo: float, hi: float) -> bool:
        return self.min_norm <= lo and hi <= self.max_norm


def norm_bounds(
    manifest: Manifest, min_norm: float | None = None, max_norm: float | None = None
) -> NormBounds:
    """l2-normalised models: 1 +- 1e-3; others: (0, 1e4] unless set (a zero vector means the
    encoder saw no input at all; a huge one, a broken table)."""
    if manifest.vector.normalization == "l2":
        lo, hi = 1 - L2_TOLERANCE, 1 + L2_TOLERANCE
    else:
        lo, hi = 1e-6, 1e4
    return NormBounds(
        min_norm if min_norm is not None else lo, max_norm if max_norm is not None else hi
    )


def part_problems(result: PartResult, bounds: NormBounds) -> list[str]:
    """Problems of one finished part (checked as parts arrive: a bad model fails fast)."""
    out = []
    if result.nonfinite:
        out.append(f"part {result.part_id}: {result.nonfinite} vectors hold NaN or inf")
    if result.computed > result.nonfinite and not bounds.contains(result.min_norm, result.max_norm):
        out.append(
            f"part {result.part_id}: norms in [{result.min_norm:.4g}, {result.max_norm:.4g}], "
            f"outside [{bounds.min_norm:.4g}, {bounds.max_norm:.4g}]"
        )
    return out


def total_problems(results: Sequence[PartResult], expected_users: int, counted: int) -> list[str]:
    """Completeness: every part's users written, and the keys really in Redis."""
    out = []
    written = sum(result.users for result in results)
    if written != expected_users:
        out.append(f"parts wrote {written} vectors, expected {expected_users}")
    if counted != expected_users:
        out.append(f"the version holds {counted} vector keys, expected {expected_users}")
    return out


def sample_problems(
    store: VectorStore, version: str, user_ids: Sequence[str], bounds: NormBounds, dim: int
) -> list[str]:
    """Read a sample back from Redis (also covers vectors copied from the previous version)."""
    got = store.read(version, list(user_ids))
    missing = sum(1 for g in got if g is None)
    out = [f"{missing} of {len(got)} sampled users have no vector"] if missing else []
    vecs = [g.vector for g in got if g is not None]
    if vecs:
        sample = np.stack(vecs)  # (S, D)
        if sample.shape[1] != dim:
            out.append(f"sampled vectors have dim {sample.shape[1]}, the model says {dim}")
        elif not np.isfinite(sample).all():
            out.append("sampled vectors hold NaN or inf")
        else:
            norms = np.linalg.norm(sample, axis=1)
            if not bounds.contains(float(norms.min()), float(norms.max())):
                out.append(f"sampled norms in [{norms.min():.4g}, {norms.max():.4g}] out of bounds")
    return out


def _unit(m: np.ndarray) -> np.ndarray:
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)


def knn_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mean share of each user's k nearest neighbours (cosine, within the sample) that the two
    spaces agree on: comparable across model versions, whose coordinates differ."""
    n = a.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return 1.0
    sims = []
    for m in (a, b):
        u = _unit(m)
        s = u @ u.T  # (S, S)
        np.fill_diagonal(s, -np.inf)
        sims.append(np.argpartition(-s, k - 1, axis=1)[:, :k])  # (S, k)
    shared = [len(set(x) & set(y)) for x, y in zip(sims[0], sims[1], strict=True)]
    return float(np.mean(shared) / k)


def drift_report(
    store: VectorStore,
    old_version: str,
    new_version: str,
    user_ids: Sequence[str],
    same_model: bool,
    k: int = 10,
) -> dict[str, Any]:
    """Drift between the serving version and the new one on a sample of users.

    Same model version (new features only): mean cosine between each user's two vectors.
    Always: overlap of k nearest neighbours within the sample.
    """
    old = store.read(old_version, list(user_ids))
    new = store.read(new_version, list(user_ids))
    pairs = [(o.vector, n.vector) for o, n in zip(old, new, strict=True) if o and n]
    report: dict[str, Any] = {"against": old_version, "sample": len(pairs), "k": k}
    if len(pairs) < 2:
        report["note"] = "too few users in both versions"
        return report
    a = np.stack([p[0] for p in pairs])  # (S, D_old)
    b = np.stack([p[1] for p in pairs])  # (S, D_new)
    if same_model and a.shape == b.shape:
        cos = np.sum(_unit(a) * _unit(b), axis=1)
        report["mean_cosine"] = round(float(cos.mean()), 6)
        report["min_cosine"] = round(float(cos.min()), 6)
    report["knn_overlap"] = round(knn_overlap(a, b, k), 4)
    return report
