"""Similar-users search: the nearest users of a user or a vector, from the index of the
embedding version the Redis pointer names (docs/similar.md).

Each poll (server.py), right after the vector pointers are read, loads the index of each served
model's pointer version when it is not the loaded one (userembed/similar_index.py: sha256
checked, in a worker thread) and swaps it in with one dict assignment; the index of the previous
version is dropped then. A request is answered only by an index whose embedding version is the
one the pointer names now: between a flip and the end of the new index's load, or for a version
without an index, it is FAILED_PRECONDITION, never an index of one version beside the pointer
of another. A query by user id takes the user's vector from the index itself, so the query and
the neighbours come from one version, the one the answer names.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import numpy as np

from embed_server.model_manager import ModelManager
from embed_server.version_policy import VersionPolicy
from userembed.errors import InvalidInputError, UserNotFoundError
from userembed.ids import parse_user_id
from userembed.similar_index import (
    DEFAULT_K,
    MAX_K,
    CorruptIndexError,
    IndexStore,
    IndexUnavailableError,
    SimilarIndex,
    SimilarUsers,
)

logger = logging.getLogger(__name__)


def check_k(k: int) -> int:
    """0 -> DEFAULT_K; 1..MAX_K as is; anything else InvalidInputError."""
    if k == 0:
        return DEFAULT_K
    if not 1 <= k <= MAX_K:
        raise InvalidInputError(f"k={k}: ask for 1..{MAX_K} neighbours (0: {DEFAULT_K})")
    return k


class SimilarSearch:
    """Loaded indexes (one per served model) and the search over them."""

    def __init__(self, indexes: IndexStore, versions: VersionPolicy, manager: ModelManager) -> None:
        self.indexes = indexes
        self.versions = versions
        self.manager = manager
        self._loaded: dict[str, SimilarIndex] = {}  # model -> index of the pointer's version
        self._loading: dict[str, str] = {}  # model -> version being loaded
        self._missing: dict[str, tuple[str, str]] = {}  # model -> (version, why): retried
        self._refused: dict[str, tuple[str, str]] = {}  # model -> (version, why): not retried
        # forgotten users (userembed/forget.py; the server's poll sets it): never an answer.
        # An index built before a forget still holds them: they are filtered out per query.
        self.forgotten: frozenset[str] = frozenset()
        self._hidden: tuple[str, frozenset[str], np.ndarray] | None = None

    # -- loading -----------------------------------------------------------------------------
    async def poll(self) -> None:
        """Load the index of each served model's pointer version, if not loaded yet."""
        for name in self.manager.models:
            wanted = self.versions.pointer(name)
            current = self._loaded.get(name)
            if current is not None and current.embedding_version != wanted:
                del self._loaded[name]  # never used again: the pointer has moved on
            if wanted is None or name in self._loaded:
                continue
            if self._refused.get(name, ("",))[0] == wanted:
                continue
            await self._load(name, wanted)

    async def _load(self, name: str, version: str) -> None:
        self._loading[name] = version
        try:
            index = await asyncio.to_thread(self.indexes.load_verified, name, version)
        except CorruptIndexError as e:
            self._refused[name] = (version, str(e))
            logger.error("model %s: refusing the similar index of %s: %s", name, version, e)
            return
        except IndexUnavailableError as e:  # not built (yet): looked for again at each poll
            if self._missing.get(name, ("",))[0] != version:
                logger.warning("model %s: %s", name, e)
            self._missing[name] = (version, str(e))
            return
        except OSError as e:
            logger.warning("model %s: loading the similar index of %s failed: %s", name, version, e)
            return
        finally:
            self._loading.pop(name, None)
        self._missing.pop(name, None)
        self._loaded[name] = index
        logger.info("model %s: similar index of %s serving", name, version)

    def index(self, model: str) -> SimilarIndex:
        """The index of the version the pointer names now; IndexUnavailableError otherwise."""
        pointer = self.versions.pointer(model)
        if pointer is None:
            raise IndexUnavailableError(f"model {model} has no published embedding version")
        index = self._loaded.get(model)
        if index is not None and index.embedding_version == pointer:
            return index
        if self._loading.get(model) == pointer:
            why = "is loading"
        else:
            problem = self._refused.get(model) or self._missing.get(model)
            why = problem[1] if problem and problem[0] == pointer else "is not loaded yet"
        raise IndexUnavailableError(
            f"similar-users index of {model} embedding version {pointer}: {why}"
        )

    def hidden(self, index: SimilarIndex) -> np.ndarray:
        """The forgotten users `index` holds (int64), found once per index and forgotten set."""
        seen = self._hidden
        if seen is None or seen[0] != index.embedding_version or seen[1] is not self.forgotten:
            held = [int(u) for u in self.forgotten if index.vector(int(u)) is not None]
            seen = (index.embedding_version, self.forgotten, np.asarray(held, dtype=np.int64))
            self._hidden = seen
        return seen[2]

    # -- requests ----------------------------------------------------------------------------
    async def find(
        self, model_name: str, user_id: str | None, vector: Sequence[float] | None, k: int
    ) -> SimilarUsers:
        """The k users nearest `user_id` (leaving the user out) or `vector` (exactly one)."""
        k = check_k(k)
        if (user_id is None) == (vector is None):
            raise InvalidInputError("give a user_id or a vector")
        model = self.manager.get(model_name)
        index = self.index(model.name)
        exclude = -1
        if user_id is not None:
            exclude = parse_user_id(user_id)
            query = None if user_id in self.forgotten else index.vector(exclude)
            if query is None:
                raise UserNotFoundError(
                    f"unknown user {user_id} in embedding version {index.embedding_version}"
                )
        else:
            query = np.asarray(vector, dtype=np.float32)
            if query.shape != (index.dim,) or not np.isfinite(query).all() or not query.any():
                raise InvalidInputError(
                    f"vector must be {index.dim} finite floats, not all zero "
                    f"(got {query.size} values)"
                )
        hidden = self.hidden(index)
        wanted = (k + 1 if exclude >= 0 else k) + len(hidden)
        scores, ids = await asyncio.to_thread(index.search, query, wanted)  # (1, wanted)
        keep = (ids[0] >= 0) & (ids[0] != exclude)
        if len(hidden):
            keep &= ~np.isin(ids[0], hidden)
        return SimilarUsers(
            model_name=model.name,
            model_version=index.meta.model_version,
            embedding_version=index.embedding_version,
            user_ids=[str(u) for u in ids[0][keep][:k].tolist()],
            scores=scores[0][keep][:k].tolist(),
        )
