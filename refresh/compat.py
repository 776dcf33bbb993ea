"""Backward-compatible vectors: at refresh time, fit a map from the new version's space into the
previous model version's space on the users both versions cover, and store it with the version.

    fitted = fit_compat(store, cfg, version, model_version, previous, user_ids)

A new model version moves every coordinate; a downstream model trained on the previous version's
vectors reads mapped vectors instead (`GetUserEmbedding(compatible_with=...)`, the server applies
the stored map; docs/compatibility.md). The map is linear: unconstrained least squares (the
default: it kept more of a downstream model's AUC, bench/compat.py) or orthogonal Procrustes
(BCT / BC-Aligner style: a rotation, norms and angles kept), chosen by
`RefreshConfig.compat_method`. It is fitted on up to
`compat_sample` shared users and scored on held-out ones (mean cosine of mapped new vectors
against the old ones), the score stored with the map, in the version's metadata (`compat`) and
on the summary line. The previous version's own maps are carried over composed with the new one
(v3 -> v1 via v2); a refresh of the same model version carries them over unchanged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from refresh.config import LSTSQ, PROCRUSTES, RefreshConfig
from userembed.compat_maps import CompatInfo, CompatMap, decode_maps, encode_map
from userembed.vectors import EmbeddingVersion, VectorStore

logger = logging.getLogger(__name__)

COMPAT_FIELD = "compat"  # the version metadata field holding each map's fit (JSON)
HELD_OUT_SHARE = 0.2  # of the shared users, scored and not fitted on
MAX_HELD_OUT = 5000
READ_BATCH = 2000  # users per pipelined read


def fit_matrix(new: np.ndarray, old: np.ndarray, method: str) -> np.ndarray:
    """The (D_new, D_old) matrix W that brings `new @ W` closest to `old` (rows pair users).

    procrustes: W with orthonormal rows or columns, from the SVD of new^T old (Schoenemann);
    lstsq: the unconstrained least-squares solution."""
    a, b = new.astype(np.float64), old.astype(np.float64)
    if method == PROCRUSTES:
        u, _, vt = np.linalg.svd(a.T @ b, full_matrices=False)
        return (u @ vt).astype(np.float32)
    if method == LSTSQ:
        return np.linalg.lstsq(a, b, rcond=None)[0].astype(np.float32)
    raise ValueError(f"unknown compat method {method!r}")


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    na = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.sum(a * b, axis=1) / np.maximum(na, 1e-12)))


def fit_map(
    new: np.ndarray, old: np.ndarray, target: str, method: str, against: str, seed: int = 0
) -> CompatMap:
    """Fit on the shared users but a held-out share, score on those (rows pair users)."""
    n = len(new)
    order = np.random.default_rng(seed).permutation(n)
    held = min(MAX_HELD_OUT, max(1, int(n * HELD_OUT_SHARE)))
    test, train = order[:held], order[held:]
    matrix = fit_matrix(new[train], old[train], method)
    # the target's vectors were unit vectors: so are the mapped ones
    norms = np.linalg.norm(old, axis=1)
    normalize = bool(np.all(np.abs(norms - 1.0) < 1e-3))
    info = CompatInfo(
        dim_in=new.shape[1],
        dim_out=old.shape[1],
        method=method,
        normalize=normalize,
        fitted_on=len(train),
        held_out=held,
        against=against,
    )
    m = CompatMap(target, matrix, info)
    fit = round(mean_cosine(m.apply(new[test]), old[test]), 6)
    raw = round(mean_cosine(new[test], old[test]), 6) if new.shape == old.shape else None
    return CompatMap(target, matrix, replace(info, fit_cosine=fit, raw_cosine=raw))


@dataclass(frozen=True)
class CompatFit:
    """What a refresh stored: each target model version's map info (`fits`), or why none was
    fitted against the previous version (`skipped`)."""

    fits: dict[str, CompatInfo]
    skipped: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {t: _info_dict(i) for t, i in self.fits.items()}
        if self.skipped:
            out["skipped"] = self.skipped
        return out

    def word(self) -> str:
        """The summary line's part: each target with its held-out fit."""
        parts = []
        for target, info in self.fits.items():
            if info.fit_cosine is None:
                parts.append(f"{target} (via {', '.join(info.via)})")
            else:
                raw = "-" if info.raw_cosine is None else f"{info.raw_cosine:.3f}"
                parts.append(f"{target} cos {info.fit_cosine:.3f} (raw {raw})")
        if self.skipped:
            parts.append(f"skipped: {self.skipped}")
        return "; ".join(parts) or "-"


def _info_dict(info: CompatInfo) -> dict[str, Any]:
    d = {k: v for k, v in vars(info).items() if v not in (None, (), "")}
    if info.via:
        d["via"] = list(info.via)
    return d


def read_pairs(
    store: VectorStore, old_ev: str, new_ev: str, user_ids: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Vectors of the users present in both versions, rows paired: (new, old)."""
    new_rows: list[np.ndarray] = []
    old_rows: list[np.ndarray] = []
    for i in range(0, len(user_ids), READ_BATCH):
        batch = list(user_ids[i : i + READ_BATCH])
        for o, n in zip(store.read(old_ev, batch), store.read(new_ev, batch), strict=True):
            if o is not None and n is not None:
                old_rows.append(o.vector)
                new_rows.append(n.vector)
    if not new_rows:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return np.stack(new_rows), np.stack(old_rows)


def stored_maps(store: VectorStore, ev: str) -> dict[str, CompatMap]:
    return decode_maps(store.r.hgetall(store.keys.compat(ev)))


def fit_compat(
    store: VectorStore,
    cfg: RefreshConfig,
    version: str,
    model_version: str,
    previous: EmbeddingVersion | None,
    user_ids: Sequence[str],
) -> CompatFit | None:
    """Fit, compose and store `version`'s maps (before its flip: readers never follow a version
    whose maps are missing), record their fit in its metadata. None when there is no previous
    version to be compatible with."""
    if previous is None or previous.id == version:
        return None
    maps: dict[str, CompatMap] = {}
    skipped = ""
    carried = stored_maps(store, previous.id)
    if previous.model_version == model_version:
        maps.update(carried)  # the same space: its maps hold unchanged
    else:
        new, old = read_pairs(store, previous.id, version, user_ids)
        least = max(new.shape[1] if new.size else 0, 10) + 2
        if len(new) < least:
            skipped = f"{len(new)} users shared with {previous.id}, {least} needed"
        else:
            fitted = fit_map(new, old, previous.model_version, cfg.compat_method, previous.id)
            maps[fitted.target] = fitted
            for target, later in carried.items():  # v3 -> v1 via v2
                if target != model_version and target not in maps:
                    maps[target] = fitted.then(later)
    if maps:
        fields: dict[str, bytes | str] = {}
        for m in maps.values():
            fields.update(encode_map(m))
        # no TTL, like the version's metadata: deleted with the version (delete_version)
        store.r.hset(store.keys.compat(version), mapping=fields)
    result = CompatFit({t: m.info for t, m in maps.items()}, skipped)
    store.r.hset(store.keys.meta(version), COMPAT_FIELD, json.dumps(result.to_dict()))
    if skipped:
        logger.warning("refresh %s: no compatibility map: %s", version, skipped)
    else:
        logger.info("refresh %s: compatibility maps: %s", version, result.word())
    return result
