"""`compatible_with`: answer in an older model version's space through the map the refresh
stored with the embedding version (userembed/compat_maps.py; docs/compatibility.md).

The maps of an embedding version are written before its flip and never change, so they are
read from Redis once per (model, embedding version) and kept in memory (a few versions, a few
KB each). A vector already in the asked space (`compatible_with` = the model version that made
it) comes back unchanged; a version without a map into the asked space is refused
(NoCompatMapError, FAILED_PRECONDITION) naming the ones it has.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

from embed_server.embedding import Embedding
from embed_server.errors import REDIS_ERRORS, NoCompatMapError, as_unavailable
from embed_server.version_policy import VersionPolicy
from userembed.compat_maps import CompatMap, decode_maps

if TYPE_CHECKING:
    from embed_server.lookup import BatchResult

CACHED_VERSIONS = 32  # (model, embedding version) entries kept; a server sees two or three


class CompatMaps:
    def __init__(self, client: Any, versions: VersionPolicy) -> None:
        self._redis = client  # the lookup's async client (a server or a cluster)
        self._versions = versions
        self._cache: OrderedDict[tuple[str, str], dict[str, CompatMap]] = OrderedDict()

    async def _maps(self, model: str, ev: str) -> dict[str, CompatMap]:
        found = self._cache.get((model, ev))
        if found is not None:
            return found
        try:
            fields = await self._redis.hgetall(self._versions.keys(model).compat(ev))
        except REDIS_ERRORS as e:
            raise as_unavailable("redis", e) from e
        maps = decode_maps(fields)
        if maps:  # an absent hash is not kept: a version might gain maps only before its flip
            self._cache[model, ev] = maps
            while len(self._cache) > CACHED_VERSIONS:
                self._cache.popitem(last=False)
        return maps

    async def find(self, model: str, model_version: str, ev: str, target: str) -> CompatMap | None:
        """The map of `ev` (made by `model_version`) into `target`'s space; None: the vectors
        are in that space already."""
        if target == model_version:
            return None
        maps = await self._maps(model, ev)
        m = maps.get(target)
        if m is None:
            have = ", ".join(sorted(maps)) or "none"
            raise NoCompatMapError(
                f"embedding version {ev} of model {model} has no map into model version "
                f"{target!r} (maps into: {have})"
            )
        return m

    async def targets(self, model_name: str) -> list[str]:
        """The model versions the serving embedding version of `model_name` has maps into."""
        model, ev = self._versions.resolve(model_name)
        return sorted(await self._maps(model.name, ev))

    async def prepare(self, model_name: str, target: str) -> int:
        """Before any work: refuse a `target` the serving version has no map into. Returns the
        dim of the answer."""
        model, ev = self._versions.resolve(model_name)
        m = await self.find(model.name, model.version, ev, target)
        return model.dim if m is None else m.info.dim_out

    async def map_one(self, e: Embedding, target: str) -> Embedding:
        m = await self.find(e.model_name, e.model_version, e.embedding_version, target)
        return e if m is None else e._replace(vector=m.apply(e.vector))

    async def map_batch(self, result: BatchResult, target: str, dim: int) -> None:
        """Every answered row of `result` mapped in place (rows grouped by the embedding version
        that answered them); failed rows become zeros of the target's `dim`."""
        model = result.model
        groups: dict[str, list[int]] = {}
        for i, error in enumerate(result.errors):
            if error is None:
                groups.setdefault(result.embedding_versions[i], []).append(i)
            else:
                result.vectors[i] = bytes(4 * dim)
        for ev, rows in groups.items():
            m = await self.find(model.name, model.version, ev, target)
            if m is None:
                continue
            x = np.frombuffer(b"".join(result.vectors[i] for i in rows), dtype="<f4")
            mapped = m.apply(x.reshape(len(rows), -1)).astype("<f4", copy=False)
            for i, row in zip(rows, mapped, strict=True):
                result.vectors[i] = row.tobytes()
