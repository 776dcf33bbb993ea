"""Which model version and embedding version answer a request.

Model version: the one the ModelManager has loaded (hot reload swaps it). Embedding version:
only vectors computed by the loaded model version are served. The Redis pointer
`ue:{<model>}:current` names the embedding version readers follow; when that version was made by
the loaded model version (its `model_version` field), the server reads and writes back there.
Otherwise (no refresh yet for this model version, a rollout in progress, a model rollback) the
server uses its own embedding version `online-<model_version>`, registered in the versions ZSET
with status "online", so it never returns a vector of another model version. Each stored
vector's own `model_version` is checked where it is read (stored_reader.stored_embedding).
Each poll also heartbeats the version each model writes back into (`ue:{<model>}:writer:<ev>`
with a TTL of several polls), so the refresh's garbage collection never deletes it while this
server lives (refresh/versions.py).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

from embed_server.errors import REDIS_ERRORS
from embed_server.model_manager import ModelManager, ServingModel
from userembed.redis_urls import AsyncRedisClient
from userembed.vectors import VectorKeys, VectorStore

logger = logging.getLogger(__name__)

ONLINE_PREFIX = "online-"
STATUS_ONLINE = "online"
WRITER_TTL_S = 60.0  # the write-back heartbeat outlives a few missed polls
WRITER_MARK = f"{socket.gethostname()} pid {os.getpid()}"  # who heartbeats (for a reader)


def online_version(model_version: str) -> str:
    """The server's own embedding version for `model_version`."""
    return f"{ONLINE_PREFIX}{model_version}"


@dataclass(frozen=True)
class VectorPointer:
    current: str | None  # the embedding version the Redis pointer names
    model_version: str  # the model version that made `current` ("" unknown)


class VersionPolicy:
    """Follows each served model's Redis pointer and says where its vectors are read and
    written (`resolve`). The pointer is polled (`refresh_pointers`): a flip is seen within one
    poll interval."""

    def __init__(self, manager: ModelManager, client: AsyncRedisClient) -> None:
        self.manager = manager
        self._redis = client
        self._keys: dict[str, VectorKeys] = {}
        self._pointers: dict[str, VectorPointer] = {}
        self._registered: set[tuple[str, str]] = set()  # (model, online version) in Redis

    def keys(self, model: str) -> VectorKeys:
        """The Redis key names of `model` (built once per model)."""
        keys = self._keys.get(model)
        if keys is None:
            keys = self._keys[model] = VectorKeys(model)
        return keys

    def resolve(self, model_name: str) -> tuple[ServingModel, str]:
        """The loaded version of `model_name` ("" = default model) and the embedding version
        its vectors are read from and written back to."""
        model = self.manager.get(model_name)
        return model, self.serving_version(model)

    def serving_version(self, model: ServingModel) -> str:
        pointer = self._pointers.get(model.name)
        if pointer is not None and pointer.current and pointer.model_version == model.version:
            return pointer.current
        return online_version(model.version)

    def pointer(self, model: str) -> str | None:
        """The embedding version the Redis pointer of `model` names (None: no pointer)."""
        pointer = self._pointers.get(model)
        return pointer.current if pointer else None

    async def refresh_pointers(self, writer_ttl_s: float = WRITER_TTL_S) -> None:
        """Read each served model's pointer and the model version behind it, then heartbeat
        the embedding version it writes back into (kept by garbage collection while alive)."""
        for name, model in self.manager.models.items():
            keys = self.keys(name)
            try:
                current = await self._redis.get(keys.current)
                made_by = (
                    await self._redis.hget(keys.meta(current.decode()), "model_version")  # type: ignore[misc]
                    if current
                    else None
                )
            except REDIS_ERRORS as e:  # unreachable, LOADING, a pointer of the wrong type
                logger.warning("model %s: cannot read the vector pointer: %s", name, e)
                continue
            new = VectorPointer(
                current.decode() if current else None, made_by.decode() if made_by else ""
            )
            if self._pointers.get(name) != new:
                logger.info(
                    "model %s: vector pointer -> %s (by %s)", name, new.current, new.model_version
                )
            self._pointers[name] = new
            try:
                writer = keys.writer(self.serving_version(model))
                await self._redis.set(writer, WRITER_MARK, px=int(writer_ttl_s * 1000))
            except REDIS_ERRORS as e:
                logger.warning("model %s: cannot heartbeat the write-back version: %s", name, e)

    def register_online(
        self, store: VectorStore, model_version: str, embedding_version: str
    ) -> None:
        """Blocking (the write-back thread): before the first write-back into an online
        version, make it a known embedding version (status "online"); once per process."""
        if not embedding_version.startswith(ONLINE_PREFIX):
            return
        seen = (store.keys.model, embedding_version)
        if seen in self._registered:
            return
        if store.version_info(embedding_version) is None:
            store.create_version(embedding_version, model_version)
            store.mark(embedding_version, STATUS_ONLINE)
        self._registered.add(seen)
