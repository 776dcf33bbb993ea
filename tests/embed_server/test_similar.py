"""FindSimilarUsers on a real server (port 0) with a real Redis and indexes built by real
refresh runs: true nearest neighbours by id and by vector, its errors, and the index switched
together with the vector pointer."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from embed_server.client import EmbeddingClient
from embed_server.server import EmbeddingServer
from refresh.config import RefreshConfig
from refresh.index_build import read_vectors
from refresh.job import refresh
from tests.refresh.support import offline_tables, refresh_config, write_offline
from tests.tiny_model import DIM, MODEL, publish_tiny
from tests.waiting import wait_for
from userembed.commands.main import main
from userembed.registry import Registry
from userembed.similar_index import MAX_K, SimilarUsers, unit_rows
from userembed.vectors import VectorStore

N_USERS = 200


@pytest.fixture
def cfg(
    redis_url: str, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> RefreshConfig:
    behavior, profile = offline_tables(N_USERS, seed=5)
    offline = write_offline(tmp_path / "offline", behavior, profile)
    similar_root = tmp_path / "similar"
    monkeypatch.setenv("USEREMBED_SIMILAR_ROOT", str(similar_root))  # where the server looks
    return refresh_config(
        registry,
        redis_url,
        offline,
        part_rows=400,
        batch_size=128,
        drift_sample=50,
        similar_root=str(similar_root),
    )


def exact_neighbours(cfg: RefreshConfig, version: str, query: np.ndarray, k: int) -> list[str]:
    """Brute force over every vector of `version` in Redis (cosine)."""
    store = VectorStore(redis.Redis.from_url(cfg.redis_url), cfg.model)
    ids, vectors = read_vectors(store, version, [str(u) for u in range(N_USERS)], DIM)
    scores = unit_rows(vectors) @ unit_rows(query[None])[0]  # (N,)
    return [str(ids[i]) for i in np.argsort(-scores)[:k]]


def stored_vector(cfg: RefreshConfig, version: str, user: str) -> np.ndarray:
    store = VectorStore(redis.Redis.from_url(cfg.redis_url), cfg.model)
    got = store.read(version, [user])[0]
    assert got is not None
    return got.vector


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_find_similar_users_by_id_and_by_vector_and_its_errors(
    cfg: RefreshConfig,
    registry: Registry,
    tmp_path: Path,
    start_server: Callable[..., EmbeddingServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    publish_tiny(registry, tmp_path / "staging", seed=0)
    s = refresh(cfg)
    srv = start_server()
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        for user in ("3", "42", "150"):
            found = c.similar(user, k=10)
            assert found.embedding_version == s.embedding_version
            assert (found.model_name, found.model_version) == (MODEL, s.model_version)
            query = stored_vector(cfg, s.embedding_version, user)
            exact = exact_neighbours(cfg, s.embedding_version, query, 11)
            assert exact[0] == user and user not in found.user_ids  # the user is left out
            assert found.user_ids == exact[1:]
            assert found.scores == sorted(found.scores, reverse=True)

        query = stored_vector(cfg, s.embedding_version, "7")
        by_vector = c.similar(vector=query, k=5)
        assert by_vector.user_ids == exact_neighbours(cfg, s.embedding_version, query, 5)
        assert by_vector.user_ids[0] == "7" and by_vector.scores[0] == pytest.approx(1.0, abs=1e-5)
        assert len(c.similar("7").user_ids) == 10  # k 0: the default

        assert code_of(lambda: c.similar("99999"))[0] == grpc.StatusCode.NOT_FOUND
        assert code_of(lambda: c.similar("7", model="nope"))[0] == grpc.StatusCode.NOT_FOUND
        for bad in (
            lambda: c.similar("7", k=MAX_K + 1),
            lambda: c.similar("7", k=-1),
            lambda: c.similar("007"),
            lambda: c.similar(vector=np.ones(DIM + 1)),
            lambda: c.similar(vector=np.zeros(DIM)),
            lambda: c.similar(),
        ):
            assert code_of(bad)[0] == grpc.StatusCode.INVALID_ARGUMENT
        top3 = c.similar("42", k=3).user_ids

    target = f"127.0.0.1:{srv.port}"
    assert main(["similar", "42", "-k", "3", "--target", target, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["embedding_version"] == s.embedding_version
    assert [n["user_id"] for n in answer["neighbors"]] == top3


def test_the_index_follows_the_pointer_and_answers_only_for_its_version(
    cfg: RefreshConfig,
    registry: Registry,
    tmp_path: Path,
    start_server: Callable[..., EmbeddingServer],
) -> None:
    publish_tiny(registry, tmp_path / "staging", seed=0)
    srv = start_server()
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        code, details = code_of(lambda: c.similar("3"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "no published" in details

        first = refresh(cfg).embedding_version
        wait_for(lambda: _answers(c) == first)

        # The pointer moves to a version without an index: refused, naming that version; the
        # loaded index of the previous version never answers for it.
        bare = refresh(replace(cfg, similar_index=False)).embedding_version
        wait_for(lambda: srv.lookup is not None and srv.lookup.versions.pointer(MODEL) == bare)
        code, details = code_of(lambda: c.similar("3"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and bare in details

        # A new model version moves every vector: after the flip the answers carry the new
        # version and its neighbours, and no answer pairs a version with another's neighbours.
        publish_tiny(registry, tmp_path / "staging", seed=1)
        second = refresh(cfg).embedding_version
        seen: set[str] = set()

        def flipped() -> bool:
            try:
                found = c.similar("3", k=10)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.FAILED_PRECONDITION  # index still loading
                return False
            _assert_exact(cfg, found, "3")
            seen.add(found.embedding_version)
            return found.embedding_version == second

        wait_for(flipped)
        assert seen <= {first, second}
        first_neighbours = exact_neighbours(
            cfg, first, stored_vector(cfg, first, "3"), 11
        )  # the old version is kept for rollback: its vectors are still in Redis
        assert c.similar("3", k=10).user_ids != first_neighbours[1:]


def _answers(c: EmbeddingClient) -> str:
    try:
        return c.similar("3").embedding_version
    except grpc.RpcError:
        return ""


def _assert_exact(cfg: RefreshConfig, found: SimilarUsers, user: str) -> None:
    version = found.embedding_version
    exact = exact_neighbours(
        cfg, version, stored_vector(cfg, version, user), len(found.user_ids) + 1
    )
    assert found.user_ids == exact[1:], version
