"""Stored compatibility maps: a linear map from one embedding version's space into the space of
an older model version, so a downstream model trained on the older vectors keeps working
(docs/compatibility.md).

The refresh fits them (refresh/compat.py) and the server applies them (embed_server/compat.py);
this module is the one place that spells their stored form. One Redis hash per embedding
version (`VectorKeys.compat(ev)`), two fields per target model version:

    map:<target model version>    the (D_new, D_target) float32 matrix, little-endian, row-major
    info:<target model version>   JSON: dim_in, dim_out, method, normalize, fit_cosine,
                                  raw_cosine, fitted_on, held_out, against, via

`mapped = vector @ matrix`, then L2-normalised when `normalize` (the target's vectors were).
Maps are immutable once the version is published.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

MAP_PREFIX = "map:"
INFO_PREFIX = "info:"


@dataclass(frozen=True)
class CompatInfo:
    """How a map was made and how well it fits (cosines on held-out users; None: composed)."""

    dim_in: int
    dim_out: int
    method: str  # "procrustes" | "lstsq" | "composed"
    normalize: bool
    fit_cosine: float | None = None  # mean cosine(mapped new, old) on held-out shared users
    raw_cosine: float | None = None  # the same without the map (same dims only)
    fitted_on: int = 0  # shared users the map was fitted on
    held_out: int = 0  # shared users the fit was scored on
    against: str = ""  # the embedding version of the target space it was fitted against
    via: tuple[str, ...] = field(default_factory=tuple)  # model versions a composed map goes via


@dataclass(frozen=True)
class CompatMap:
    target: str  # the model version whose space the map leads into
    matrix: np.ndarray  # (dim_in, dim_out) float32
    info: CompatInfo

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """(N, dim_in) or (dim_in,) -> the same rows in the target space, float32."""
        out = np.asarray(vectors, dtype=np.float32) @ self.matrix
        if self.info.normalize:
            norms = np.linalg.norm(out, axis=-1, keepdims=True)
            out = out / np.maximum(norms, 1e-12)
        return out.astype(np.float32, copy=False)

    def then(self, other: CompatMap) -> CompatMap:
        """This map followed by `other` (this target's space -> other's target)."""
        matrix = (self.matrix @ other.matrix).astype(np.float32)
        info = CompatInfo(
            dim_in=self.info.dim_in,
            dim_out=other.info.dim_out,
            method="composed",
            normalize=other.info.normalize,
            against=other.info.against,
            via=(*self.info.via, self.target, *other.info.via),
        )
        return CompatMap(other.target, matrix, info)


def encode_map(m: CompatMap) -> dict[str, bytes | str]:
    """The hash fields of one map."""
    info = {**asdict(m.info), "via": list(m.info.via)}
    return {
        MAP_PREFIX + m.target: np.ascontiguousarray(m.matrix, dtype="<f4").tobytes(),
        INFO_PREFIX + m.target: json.dumps(info, sort_keys=True),
    }


def decode_maps(fields: dict[Any, Any]) -> dict[str, CompatMap]:
    """Every map of one stored hash (HGETALL's reply), by target model version."""
    text = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
    out: dict[str, CompatMap] = {}
    for name, raw in text.items():
        if not name.startswith(MAP_PREFIX):
            continue
        target = name[len(MAP_PREFIX) :]
        info_raw = text.get(INFO_PREFIX + target)
        if info_raw is None:
            continue
        d = json.loads(info_raw)
        info = CompatInfo(**{**d, "via": tuple(d.get("via", ()))})
        matrix = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        out[target] = CompatMap(target, matrix.reshape(info.dim_in, info.dim_out), info)
    return out


def targets_of(fields: Iterable[Any]) -> list[str]:
    """The target model versions a stored hash has maps for (HKEYS' reply), sorted."""
    names = [k.decode() if isinstance(k, bytes) else k for k in fields]
    return sorted(n[len(MAP_PREFIX) :] for n in names if n.startswith(MAP_PREFIX))
