"""Similar-user indexes: one approximate nearest-neighbour index per model and embedding version.

Layout (root = `userembed.paths.similar_root()`: `$USEREMBED_SIMILAR_ROOT`, else
`<USEREMBED_HOME>/similar`):

    <root>/<model>/<embedding version>/index.faiss   faiss IndexIDMap2(IndexHNSWFlat), ids = user ids
    <root>/<model>/<embedding version>/index.json    written last: an index exists once it is there

`index.json` names the model, the embedding version and the model version that made its
vectors, the dim, the user count, the HNSW parameters, and the sha256 and size of
`index.faiss`. Vectors are L2-normalised when added and queries when searched, so the inner
product the index ranks by is the cosine similarity. The refresh builds an index for each
embedding version before it flips the pointer (refresh/index_build.py); the server loads the
index of the version the pointer names (embed_server/similar.py). `load_verified` checks the
sha256 of the exact bytes it deserialises and reports every problem in one CorruptIndexError.
faiss is imported only where an index is built or loaded: the refresh config imports this
module for its defaults.

    indexes = IndexStore()                                       # or IndexStore("/data/similar")
    meta = indexes.write(model, ev, model_version, build_hnsw(user_ids, vectors, params), params)
    index = indexes.load_verified(model, ev)                     # -> SimilarIndex
    scores, ids = index.search(queries, k=10)
    indexes.prune(model, keep={ev, ...})                         # drop the indexes of gone versions
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from userembed import paths
from userembed.errors import InvalidInputError, UserEmbedError
from userembed.staged_files import StagedFiles

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
META_FILE = "index.json"
FORMAT = 1
METRIC = "cosine"
DEFAULT_K = 10  # FindSimilarUsers' k when the request leaves it at 0
MAX_K = 1000  # past it a request is INVALID_ARGUMENT: HNSW answers degrade as k nears ef


class IndexUnavailableError(UserEmbedError):
    """No usable index for the embedding version asked for (missing, loading or corrupt)."""

    grpc_status = "FAILED_PRECONDITION"


class CorruptIndexError(IndexUnavailableError):
    """An index whose files do not match its index.json."""


@dataclass(frozen=True)
class IndexParams:
    """HNSW parameters (Malkov & Yashunin 2016): `m` links per node, beam widths at build and
    at search. Defaults chosen with bench/similar.py (recall@10 >= 0.95 at 1M users)."""

    m: int = 16
    ef_construction: int = 128
    ef_search: int = 64

    def __post_init__(self) -> None:
        if self.m < 2 or self.ef_construction < 1 or self.ef_search < 1:
            raise InvalidInputError(f"invalid HNSW parameters {self}: m >= 2, ef >= 1")


@dataclass(frozen=True)
class IndexMeta:
    """The content of index.json."""

    model: str
    embedding_version: str
    model_version: str
    dim: int
    users: int
    params: IndexParams
    sha256: str
    size: int
    built_at: str
    metric: str = METRIC
    format: int = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, data: bytes, source: str) -> IndexMeta:
        try:
            d = json.loads(data)
            d["params"] = IndexParams(**d["params"])
            meta = cls(**d)
        except (ValueError, TypeError, KeyError, InvalidInputError) as e:
            raise CorruptIndexError(f"{source}: not a valid index.json: {e}") from e
        if meta.format != FORMAT or meta.metric != METRIC:
            raise CorruptIndexError(
                f"{source}: format {meta.format} / metric {meta.metric}, "
                f"this reader knows {FORMAT} / {METRIC}"
            )
        return meta


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """(N, D) float32 rows scaled to norm 1 (cosine via inner product); zero rows stay zero."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def build_hnsw(user_ids: np.ndarray, vectors: np.ndarray, params: IndexParams) -> Any:
    """An in-memory faiss index of `vectors` (N, D) under int64 `user_ids` (N,)."""
    import faiss  # the refresh and the server only: not on the CLI's import path

    ids = np.ascontiguousarray(user_ids, dtype=np.int64)
    x = unit_rows(vectors)
    if x.ndim != 2 or ids.shape != (x.shape[0],):
        raise InvalidInputError(f"{ids.shape} user ids for vectors of shape {x.shape}")
    if len(np.unique(ids)) != len(ids):
        raise InvalidInputError("user ids repeat: one vector per user")
    hnsw = faiss.IndexHNSWFlat(x.shape[1], params.m, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = params.ef_construction
    hnsw.hnsw.efSearch = params.ef_search
    index = faiss.IndexIDMap2(hnsw)
    index.add_with_ids(x, ids)
    return index


@dataclass(frozen=True)
class SimilarUsers:
    """A FindSimilarUsers answer (server and client): neighbours nearest first, and the
    version of the index that answered."""

    model_name: str
    model_version: str  # the encoder version that made the index's vectors
    embedding_version: str
    user_ids: list[str]
    scores: list[float]  # cosine similarity to the query


class SimilarIndex:
    """A loaded index: search by vectors, and the stored vector of a user."""

    def __init__(self, meta: IndexMeta, index: Any) -> None:
        self.meta = meta
        self._index = index

    @property
    def embedding_version(self) -> str:
        return self.meta.embedding_version

    @property
    def dim(self) -> int:
        return self.meta.dim

    def vector(self, user_id: int) -> np.ndarray | None:
        """The user's (unit) vector as indexed; None for a user the index does not hold."""
        try:
            return np.asarray(self._index.reconstruct(int(user_id)), dtype=np.float32)
        except RuntimeError:  # faiss: "key not found"
            return None

    def search(
        self, queries: np.ndarray, k: int, ef_search: int | None = None, threads: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) queries -> (scores (Q, k), user ids (Q, k)), nearest first; a row holds id -1
        past the index's size. `ef_search` None: the one it was built with (at least k).
        Thread-safe: faiss searches only read. `threads`: OpenMP threads of this call (a
        per-thread setting); one query gains nothing from more, and on busy cores an OpenMP
        team per call costs a hundred times the search itself (bench/similar.py)."""
        import faiss

        faiss.omp_set_num_threads(threads)
        q = unit_rows(np.atleast_2d(queries))
        ef = max(ef_search or self.meta.params.ef_search, k)
        params = faiss.SearchParametersHNSW(efSearch=ef)  # type: ignore[attr-defined]
        scores, ids = self._index.search(q, k, params=params)
        return scores, ids


class IndexStore:
    """Indexes under `root` (local folder); the only place that spells the layout."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else paths.similar_root()

    def __repr__(self) -> str:
        return f"IndexStore({str(self.root)!r})"

    def version_dir(self, model: str, embedding_version: str) -> Path:
        return self.root / model / embedding_version

    def exists(self, model: str, embedding_version: str) -> bool:
        return (self.version_dir(model, embedding_version) / META_FILE).is_file()

    def versions(self, model: str) -> list[str]:
        """Embedding versions of `model` with an index folder (complete or not), sorted."""
        base = self.root / model
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def write(
        self,
        model: str,
        embedding_version: str,
        model_version: str,
        index: Any,
        params: IndexParams,
    ) -> IndexMeta:
        """Store a built index (`build_hnsw`) of one embedding version (index.json last)."""
        import faiss

        data = faiss.serialize_index(index).tobytes()
        meta = IndexMeta(
            model=model,
            embedding_version=embedding_version,
            model_version=model_version,
            dim=int(index.d),
            users=int(index.ntotal),
            params=params,
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            built_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        folder = self.version_dir(model, embedding_version)
        with StagedFiles() as staged:
            staged.path(folder / INDEX_FILE).write_bytes(data)
            staged.path(folder / META_FILE).write_text(meta.to_json())
            staged.commit()  # renames in order: the index file, then index.json
        mb = meta.size / 1e6
        logger.info(
            "similar index %s/%s: %d users, %.1f MB", model, embedding_version, meta.users, mb
        )
        return meta

    def read_meta(self, model: str, embedding_version: str) -> IndexMeta:
        path = self.version_dir(model, embedding_version) / META_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError as e:
            raise IndexUnavailableError(
                f"no similar-users index for {model} embedding version {embedding_version}"
            ) from e
        meta = IndexMeta.from_json(data, str(path))
        if (meta.model, meta.embedding_version) != (model, embedding_version):
            raise CorruptIndexError(
                f"{path}: names {meta.model}/{meta.embedding_version}, "
                f"but lies at {model}/{embedding_version}"
            )
        return meta

    def load_verified(self, model: str, embedding_version: str) -> SimilarIndex:
        """Read index.json, check the index file's size and sha256 on the very bytes that are
        deserialised, and its dim and count; one CorruptIndexError lists every problem."""
        import faiss

        meta = self.read_meta(model, embedding_version)
        path = self.version_dir(model, embedding_version) / INDEX_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError as e:
            raise CorruptIndexError(f"{path} is missing (index.json is there)") from e
        problems = []
        if len(data) != meta.size:
            problems.append(f"{INDEX_FILE} has {len(data)} bytes, index.json says {meta.size}")
        elif hashlib.sha256(data).hexdigest() != meta.sha256:
            problems.append(f"{INDEX_FILE} sha256 does not match index.json")
        index = None
        if not problems:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
            if index.d != meta.dim or index.ntotal != meta.users:
                problems.append(
                    f"{INDEX_FILE} holds {index.ntotal} x {index.d}, "
                    f"index.json says {meta.users} x {meta.dim}"
                )
        if problems:
            raise CorruptIndexError(
                f"similar index {model}/{embedding_version} is corrupt: " + "; ".join(problems)
            )
        logger.info("loaded similar index %s/%s (%d users)", model, embedding_version, meta.users)
        return SimilarIndex(meta, index)

    def prune(self, model: str, keep: set[str]) -> list[str]:
        """Delete the index folders of `model` whose embedding version is not in `keep`."""
        gone = [v for v in self.versions(model) if v not in keep]
        for v in gone:
            shutil.rmtree(self.version_dir(model, v), ignore_errors=True)
            logger.info("deleted similar index %s/%s", model, v)
        return gone
