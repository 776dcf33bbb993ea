"""`compatible_with` against a real gRPC server and Redis: a model version with a stored map
answers mapped vectors (single and batch, stored and computed), one without is
FAILED_PRECONDITION naming the maps there are, and without the field nothing changes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from embed_server.client import EmbeddingClient, ItemError
from tests.embed_server.conftest import DIM, MODEL, publish_tiny
from userembed.commands.main import main
from userembed.compat_maps import CompatInfo, CompatMap, encode_map
from userembed.registry import Registry
from userembed.vectors import VectorStore

OLD = "old-model-version"
OUT_DIM = 5  # the old space may have another width


@pytest.fixture
def v1(registry: Registry, tmp_path: Path) -> str:
    return publish_tiny(registry, tmp_path / "staging", seed=1)


@pytest.fixture
def stored(v1: str, redis_url: str) -> tuple[np.ndarray, np.ndarray]:
    """ev1 of v1 serves user 7's vector and holds a map into OLD's space."""
    store = VectorStore(redis.Redis.from_url(redis_url), MODEL)
    vec = np.linspace(-1.0, 1.0, DIM, dtype=np.float32)
    matrix = np.random.default_rng(0).normal(size=(DIM, OUT_DIM)).astype(np.float32)
    store.create_version("ev1", v1)
    store.write("ev1", ["7"], vec[None, :], v1)
    info = CompatInfo(dim_in=DIM, dim_out=OUT_DIM, method="procrustes", normalize=True)
    store.r.hset(store.keys.compat("ev1"), mapping=encode_map(CompatMap(OLD, matrix, info)))
    store.publish("ev1")
    return vec, matrix


def _mapped(vec: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    out = vec @ matrix
    return out / np.linalg.norm(out)


def test_compatible_with_a_mapped_version_returns_the_mapped_vector(start_server, stored, v1):
    vec, matrix = stored
    srv = start_server()
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        e = c.get("7", compatible_with=OLD)
        computed = c.get("3", compatible_with=OLD)  # a miss: computed, written back, mapped
        plain3 = c.get("3")
        items = c.batch_get(["7", "", "3"], compatible_with=OLD)
        packed = c.batch_get(["7", "", "3"], compatible_with=OLD, packed=True)
        itself = c.get("7", compatible_with=v1)  # the served space already
    np.testing.assert_allclose(e.vector, _mapped(vec, matrix), rtol=1e-5, atol=1e-6)
    assert (e.model_version, e.embedding_version, e.source) == (v1, "ev1", "stored")
    assert computed.source == "computed" and plain3.source == "stored"
    np.testing.assert_allclose(computed.vector, _mapped(plain3.vector, matrix), atol=1e-6)
    for batch in (items, packed):
        first, bad, third = batch
        assert isinstance(bad, ItemError) and bad.code == grpc.StatusCode.INVALID_ARGUMENT
        assert not isinstance(first, ItemError) and not isinstance(third, ItemError)
        np.testing.assert_allclose(first.vector, e.vector, atol=1e-6)
        np.testing.assert_allclose(third.vector, computed.vector, atol=1e-6)
    np.testing.assert_array_equal(itself.vector, vec)


def test_list_models_names_the_versions_compatible_with_accepts(start_server, v1, redis_url):
    srv = start_server()  # nothing refreshed: the server's own online version, no maps
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        (info,) = c.list_models().models
        assert (info.version, list(info.compatible_with)) == (v1, [])
    store = VectorStore(redis.Redis.from_url(redis_url), MODEL)
    store.create_version("ev1", v1)
    matrix = np.eye(DIM, OUT_DIM, dtype=np.float32)
    info_ = CompatInfo(dim_in=DIM, dim_out=OUT_DIM, method="lstsq", normalize=True)
    for old in (OLD, "an-older-version"):
        store.r.hset(store.keys.compat("ev1"), mapping=encode_map(CompatMap(old, matrix, info_)))
    store.publish("ev1")
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        deadline = time.monotonic() + 30  # the next pointer poll serves ev1
        while (info := c.list_models().models[0]).serving_embedding_version != "ev1":
            assert time.monotonic() < deadline, "the pointer poll never served ev1"
            time.sleep(0.05)
        assert list(info.compatible_with) == sorted([OLD, "an-older-version"])
        np.testing.assert_array_equal(
            c.get("7", compatible_with="an-older-version").vector.shape, (OUT_DIM,)
        )


def test_a_version_without_a_map_is_failed_precondition(start_server, stored):
    srv = start_server()
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        for call in (
            lambda: c.get("7", compatible_with="never-trained"),
            lambda: c.batch_get(["7"], compatible_with="never-trained", packed=True),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert OLD in err.value.details() and "never-trained" in err.value.details()


def test_no_map_at_all_is_failed_precondition(start_server, v1):
    srv = start_server()  # nothing refreshed: the server's own online version, no maps
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        with pytest.raises(grpc.RpcError) as err:
            c.get("7", compatible_with=OLD)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "maps into: none" in err.value.details()


def test_without_the_field_nothing_changes(start_server, stored):
    vec, _ = stored
    srv = start_server()
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        e = c.get("7")
        (b,) = c.batch_get(["7"], packed=True)
    np.testing.assert_array_equal(e.vector, vec)
    np.testing.assert_array_equal(b.vector, vec)


def test_cli_embed_compatible_with(start_server, stored, capsys):
    vec, matrix = stored
    srv = start_server()
    target = ["--target", f"127.0.0.1:{srv.port}"]
    assert main(["embed", "--user-id", "7", *target, "--compatible-with", OLD, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["compatible_with"], out["dim"]) == (OLD, OUT_DIM)
    np.testing.assert_allclose(out["vector"], _mapped(vec, matrix), atol=1e-6)
    assert main(["embed", "--user-id", "7", *target, "--compatible-with", "nope"]) != 0
    assert "FAILED_PRECONDITION" in capsys.readouterr().err
