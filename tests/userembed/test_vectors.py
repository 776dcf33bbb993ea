"""The Redis vector store layout, against a real Redis."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from userembed import resp
from userembed.vectors import VectorKeys, VectorStore


def test_write_read_roundtrip_and_missing(redis_url: str) -> None:
    store = VectorStore(redis.Redis.from_url(redis_url), "m")
    vecs = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    store.create_version("e1", "v1")
    store.write("e1", ["1", "2", "3"], vecs, "v1", feature_ts_ms=[10, 20, 30])
    got = store.read("e1", ["2", "9", "1"])
    assert got[1] is None
    np.testing.assert_array_equal(got[0].vector, vecs[1])
    assert got[0].feature_ts_ms == 20 and got[2].model_version == "v1"
    assert store.count("e1") == 3


def test_fp16_vectors_read_back_close(redis_url: str) -> None:
    store = VectorStore(redis.Redis.from_url(redis_url), "m")
    v = np.linspace(-1, 1, 16, dtype=np.float32)[None]
    store.write("e", ["u"], v, "v1", dtype="f16")
    np.testing.assert_allclose(store.read("e", ["u"])[0].vector, v[0], atol=1e-3)


def test_publish_flips_pointer_and_returns_previous(redis_url: str) -> None:
    store = VectorStore(redis.Redis.from_url(redis_url), "m")
    assert store.current_version() is None
    store.create_version("e1", "v1")
    assert store.publish("e1") is None
    store.create_version("e2", "v1")
    assert store.current_version() == "e1"  # building versions stay invisible
    assert store.publish("e2", users=5) == "e1"
    assert store.current_version() == "e2"
    assert [v.id for v in store.list_versions()] == ["e1", "e2"]
    assert store.version_info("e2").status == "ready"


def test_delete_version_removes_vectors_and_meta(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    store = VectorStore(r, "m")
    store.create_version("old", "v1")
    store.write("old", [str(i) for i in range(50)], np.ones((50, 4), np.float32), "v1")
    assert store.delete_version("old") == 50
    assert store.count("old") == 0 and store.version_info("old") is None


def test_keys_are_cluster_safe() -> None:
    k = VectorKeys("supermoe")
    # control keys share one hash tag (one slot, MULTI allowed); vector keys are tagged per user
    assert k.current.count("{supermoe}") == 1 and "{supermoe}" in k.meta("e")
    assert k.vector("e", "42").endswith("{42}")


def test_failed_write_raises_and_keeps_the_connection_usable(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    store = VectorStore(r, "m")
    r.set(store.keys.vector("e", "2"), "not a hash")  # HSET on it fails with WRONGTYPE
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        store.write("e", ["1", "2", "3"], np.ones((3, 4), np.float32), "v1")
    assert r.ping()
    got = store.read("e", ["1", "3"])
    assert all(g is not None for g in got)  # the rest of the batch was written
    store.write("e", ["4"], np.ones((1, 4), np.float32), "v1")  # and the store still writes
    assert store.read("e", ["4"])[0] is not None


def test_write_can_report_each_users_error_reply_instead_of_raising(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    store = VectorStore(r, "m")
    r.set(store.keys.vector("e", "2"), "not a hash")
    errors = store.write(
        "e", ["1", "2", "3"], np.ones((3, 4), np.float32), "v1", raise_on_error=False
    )
    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], redis.ResponseError) and "WRONGTYPE" in str(errors[1])
    assert [g is not None for g in store.read("e", ["1", "3"])] == [True, True]


def test_resp_encoder_writes_what_redis_py_sends() -> None:
    args = (b"HSET", b"ue:m:e:{1}", b"vector", bytes(range(256)) * 40, b"dtype", b"f32", b"")
    assert resp.command(*args) == b"".join(redis.Connection().pack_command(*args))
    payload = b"\x00\r\n\xff"  # binary bytes, CRLF inside: lengths frame them, not delimiters
    assert resp.bulk_header(len(payload)) + payload + resp.CRLF == resp.bulk(payload)
    assert resp.array_header(2) + resp.bulk(b"GET") + resp.bulk(b"k") == resp.command(b"GET", b"k")
